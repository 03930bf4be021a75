/*
 * LD_PRELOAD fault injection for the fault tests: makes one call that writes under a given
 * directory fail, as a full disk or a failing one would.
 *
 *   MB_FAULT_UNDER=DIR      only calls that write at or below DIR count (the backup's
 *                           destination, a restore's target): reading the source never fails
 *   MB_FAULT_AT=N           the N-th such call (1-based, counted over the whole process) fails;
 *                           0 or unset: none fails, the calls are only counted
 *   MB_FAULT_ERRNO=ENOSPC   or EIO, EDQUOT (default ENOSPC)
 *   MB_FAULT_ACTION=kill    instead of failing the call, the process kills itself with SIGKILL
 *                           just before it (a crash or `kill -9` at exactly that point)
 *   MB_FAULT_COUNT=FILE     at exit, the number of calls that counted is written to FILE
 *
 * Calls that count: write, pwrite64, fsync, fdatasync, syncfs, ftruncate (by fd), and
 * openat/openat64 with O_CREAT, mkdirat, renameat, renameat2, linkat, symlinkat, unlinkat (by
 * the directory they change). Each wraps the real function (dlsym(RTLD_NEXT)).
 *
 * Build: cc -shared -fPIC -o faults.so faults.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

static atomic_long counted;

static const char *under(void)
{
	const char *u = getenv("MB_FAULT_UNDER");
	return u != NULL && *u != '\0' ? u : NULL;
}

static int is_below(const char *path)
{
	const char *u = under();
	size_t n;

	if (u == NULL || path == NULL)
		return 0;
	n = strlen(u);
	return strncmp(path, u, n) == 0 && (path[n] == '\0' || path[n] == '/');
}

/* The path an fd stands for (a file, or a directory for the *at calls). */
static int fd_path(int fd, char *buf, size_t size)
{
	char link[64];
	ssize_t n;

	if (fd == AT_FDCWD)
		return getcwd(buf, size) != NULL ? 0 : -1;
	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	n = readlink(link, buf, size - 1);
	if (n < 0)
		return -1;
	buf[n] = '\0';
	return 0;
}

static int fd_below(int fd)
{
	char path[PATH_MAX];

	return under() != NULL && fd > 2 && fd_path(fd, path, sizeof(path)) == 0 && is_below(path);
}

static int at_below(int dirfd, const char *name)
{
	char path[PATH_MAX];

	if (under() == NULL || name == NULL)
		return 0;
	if (name[0] == '/')
		return is_below(name);
	return fd_path(dirfd, path, sizeof(path)) == 0 && is_below(path);
}

static int fault_errno(void)
{
	const char *e = getenv("MB_FAULT_ERRNO");

	if (e != NULL && strcmp(e, "EIO") == 0)
		return EIO;
	if (e != NULL && strcmp(e, "EDQUOT") == 0)
		return EDQUOT;
	return ENOSPC;
}

/* Counts a call that writes below MB_FAULT_UNDER; true if it is the one to fail. */
static int fails(int below)
{
	const char *at = getenv("MB_FAULT_AT");
	long n, target;

	if (!below)
		return 0;
	n = atomic_fetch_add(&counted, 1) + 1;
	target = at != NULL ? atol(at) : 0;
	if (target > 0 && n == target) {
		const char *action = getenv("MB_FAULT_ACTION");

		if (action != NULL && strcmp(action, "kill") == 0)
			raise(SIGKILL);
		errno = fault_errno();
		return 1;
	}
	return 0;
}

__attribute__((destructor)) static void write_count(void)
{
	const char *file = getenv("MB_FAULT_COUNT");
	FILE *f;

	if (file == NULL || (f = fopen(file, "w")) == NULL)
		return;
	fprintf(f, "%ld\n", atomic_load(&counted));
	fclose(f);
}

#define REAL(name) static __typeof__(name) *real; if (real == NULL) real = dlsym(RTLD_NEXT, #name)

ssize_t write(int fd, const void *buf, size_t count)
{
	REAL(write);
	if (fails(fd_below(fd)))
		return -1;
	return real(fd, buf, count);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off64_t off)
{
	REAL(pwrite64);
	if (fails(fd_below(fd)))
		return -1;
	return real(fd, buf, count, off);
}

int fsync(int fd)
{
	REAL(fsync);
	if (fails(fd_below(fd)))
		return -1;
	return real(fd);
}

int fdatasync(int fd)
{
	REAL(fdatasync);
	if (fails(fd_below(fd)))
		return -1;
	return real(fd);
}

int syncfs(int fd)
{
	REAL(syncfs);
	if (fails(fd_below(fd)))
		return -1;
	return real(fd);
}

int ftruncate(int fd, off_t len)
{
	REAL(ftruncate);
	if (fails(fd_below(fd)))
		return -1;
	return real(fd, len);
}

static int open_at(int (*real)(int, const char *, int, ...), int dirfd, const char *name, int flags, mode_t mode)
{
	if ((flags & O_CREAT) != 0 && fails(at_below(dirfd, name)))
		return -1;
	return real(dirfd, name, flags, mode);
}

/* openat and openat64: the same, but for their names. */
#define OPEN_AT(name)                                                        \
	int name(int dirfd, const char *path, int flags, ...)                \
	{                                                                    \
		va_list ap;                                                  \
		mode_t mode;                                                 \
		REAL(name);                                                  \
		va_start(ap, flags);                                         \
		mode = (flags & (O_CREAT | O_TMPFILE)) != 0 ? va_arg(ap, mode_t) : 0; \
		va_end(ap);                                                  \
		return open_at(real, dirfd, path, flags, mode);              \
	}

OPEN_AT(openat)
OPEN_AT(openat64)

int mkdirat(int dirfd, const char *name, mode_t mode)
{
	REAL(mkdirat);
	if (fails(at_below(dirfd, name)))
		return -1;
	return real(dirfd, name, mode);
}

int renameat(int olddirfd, const char *oldname, int newdirfd, const char *newname)
{
	REAL(renameat);
	if (fails(at_below(newdirfd, newname)))
		return -1;
	return real(olddirfd, oldname, newdirfd, newname);
}

int renameat2(int olddirfd, const char *oldname, int newdirfd, const char *newname, unsigned int flags)
{
	REAL(renameat2);
	if (fails(at_below(newdirfd, newname)))
		return -1;
	return real(olddirfd, oldname, newdirfd, newname, flags);
}

int linkat(int olddirfd, const char *oldname, int newdirfd, const char *newname, int flags)
{
	REAL(linkat);
	if (fails(at_below(newdirfd, newname)))
		return -1;
	return real(olddirfd, oldname, newdirfd, newname, flags);
}

int symlinkat(const char *target, int newdirfd, const char *newname)
{
	REAL(symlinkat);
	if (fails(at_below(newdirfd, newname)))
		return -1;
	return real(target, newdirfd, newname);
}

int unlinkat(int dirfd, const char *name, int flags)
{
	REAL(unlinkat);
	if (fails(at_below(dirfd, name)))
		return -1;
	return real(dirfd, name, flags);
}
