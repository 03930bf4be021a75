/*
 * LD_PRELOAD shim for tests/lock.rs: simulate the NFS "lost reply" case for dot-locks.
 *
 * link() and linkat() call the real functions (dlsym(RTLD_NEXT)); when the real call succeeded
 * and the new name ends in ".lock", they report failure with EIO anyway, as an NFS client does
 * when the server made the link but the reply was lost. (Rust's std::fs::hard_link uses linkat()
 * on Linux, so both are wrapped.)
 *
 * If LINK_LIES_LOG names a file, one line "<pid> <newpath>" is appended to it per lie, so a test
 * can prove the shim was actually in effect.
 *
 * Build: cc -shared -fPIC -o link_lies.so link_lies.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int ends_with_lock(const char *path)
{
	size_t n = path == NULL ? 0 : strlen(path);
	return n >= 5 && strcmp(path + n - 5, ".lock") == 0;
}

static void log_lie(const char *newpath)
{
	const char *log = getenv("LINK_LIES_LOG");
	char line[4200];
	int fd, len;

	if (log == NULL || *log == '\0')
		return;
	fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0666);
	if (fd < 0)
		return;
	len = snprintf(line, sizeof(line), "%ld %s\n", (long)getpid(), newpath);
	if (len > 0 && (size_t)len < sizeof(line))
		(void)write(fd, line, (size_t)len);
	close(fd);
}

int link(const char *oldpath, const char *newpath)
{
	static int (*real_link)(const char *, const char *);
	int ret;

	if (real_link == NULL) {
		real_link = (int (*)(const char *, const char *))dlsym(RTLD_NEXT, "link");
		if (real_link == NULL) {
			errno = ENOSYS;
			return -1;
		}
	}
	ret = real_link(oldpath, newpath);
	if (ret == 0 && ends_with_lock(newpath)) {
		log_lie(newpath);
		errno = EIO;
		return -1;
	}
	return ret;
}

int linkat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, int flags)
{
	static int (*real_linkat)(int, const char *, int, const char *, int);
	int ret;

	if (real_linkat == NULL) {
		real_linkat = (int (*)(int, const char *, int, const char *, int))dlsym(RTLD_NEXT, "linkat");
		if (real_linkat == NULL) {
			errno = ENOSYS;
			return -1;
		}
	}
	ret = real_linkat(olddirfd, oldpath, newdirfd, newpath, flags);
	if (ret == 0 && ends_with_lock(newpath)) {
		log_lie(newpath);
		errno = EIO;
		return -1;
	}
	return ret;
}
