/* The interface between the C shim (which speaks Dovecot) and the Rust core (which copies).
   Plain C types only: bindgen reads this file, and it must not need Dovecot's headers. */
#ifndef MAILDIR_BACKUP_SHIM_H
#define MAILDIR_BACKUP_SHIM_H

#include <stdint.h>

/* One mailbox, with the paths Dovecot itself uses for it. */
struct mb_folder {
	const char *vname;       /* mailbox name, for output */
	const char *mail_dir;    /* MAILBOX path: holds cur/ new/ tmp/ */
	const char *control_dir; /* CONTROL path: holds dovecot-uidlist and its lock */
	const char *index_dir;   /* INDEX path, or NULL */
};

/* What the shim hands the core for one user. Callbacks run on the calling thread only. */
struct mb_user_job {
	const char *username;
	const char *dest_template; /* may hold %u %n %d / %{user}...; NULL: none given
				      (the stage when hand_off is set) */
	const char *root_dir;      /* the user's Maildir root (INBOX) */
	const char *control_root;  /* NULL unless control files live elsewhere */
	const char *index_root;    /* NULL unless index files live elsewhere */
	const char *layout;        /* "maildir++" or "fs" */
	const struct mb_folder *folders;
	unsigned int folder_count;
	double lock_timeout_secs;  /* < 0: default */
	unsigned int jobs;         /* 0: default */
	int with_indexes;          /* 0 or 1 */
	int link;                  /* 1: hard-link message files (same file system only) */
	int checksum;              /* 1: record checksums of linked message files */
	const char *hand_off;      /* a shell command to run on a link snapshot at the stage
				      (doveadm maildir-backup-hand-off); NULL: a backup */
	int keep_stage;            /* 1: leave the stage after the hand-off */
	int imap_view;             /* 1: a repo: destination makes the series' IMAP view */
	const char *metrics_file;  /* a Prometheus textfile to update; NULL: none */

	void *ctx;
	/* Dovecot's own uidlist lock of folders[i]: 1 locked, 0 busy, -1 error */
	int (*try_lock)(void *ctx, unsigned int folder);
	void (*unlock)(void *ctx, unsigned int folder);
	void (*touch)(void *ctx, unsigned int folder);
	/* Brings Dovecot's copy of folders[i]'s uidlist up to date without the lock, so
	   that try_lock (which refreshes it under the lock) reads only what changed since. */
	void (*refresh)(void *ctx, unsigned int folder);
	/* One output row per folder; status is "ok" or an error text. */
	void (*row)(void *ctx, const char *mailbox, uint64_t messages,
		    uint64_t bytes, double lock_ms, const char *status);
	void (*error)(void *ctx, const char *message);
	/* Lists the mailboxes again (the user may have created or renamed some since):
	   returns every mailbox found so far, old ones keep their index. 0 ok, -1 error. */
	int (*relist)(void *ctx, const struct mb_folder **folders_r, unsigned int *count_r);
};

/* A restore for one user, into the mail location Dovecot gives for that user. */
struct mb_restore_job {
	const char *username;
	const char *snapshot_template; /* a backup/snapshot dir, or repo:REPO for its latest */
	const char *root_dir;
	const char *control_root;
	const char *index_root;
	const char *layout;
	const char *const *folders;   /* NULL-terminated, may be NULL */
	const char *const *messages;  /* unique names, NULL-terminated, may be NULL */
	const char *const *uids;      /* FOLDER:UID, NULL-terminated, may be NULL */
	int dry_run;

	void *ctx;
	void (*row)(void *ctx, const char *mode, uint64_t restored, uint64_t skipped,
		    const char *status);
	void (*error)(void *ctx, const char *message);
};

/* The record of a user's last backup into a repository. */
struct mb_status_job {
	const char *username;
	const char *repo_template;    /* repo:REPO */

	void *ctx;
	/* result: "ok", "failed" or "none" (no run recorded); times are UTC ISO 8601 or "-". */
	void (*row)(void *ctx, const char *result, const char *started, const char *finished,
		    int exit_code, const char *snapshot, const char *error);
	void (*error)(void *ctx, const char *message);
};

/* Implemented in Rust: backs up one user; returns a sysexits code (0 = success). */
int mb_backup_user(const struct mb_user_job *job);
/* Implemented in Rust: restores into one user; returns a sysexits code. */
int mb_restore_user(const struct mb_restore_job *job);

/* Implemented in Rust: reports a user's last run; returns a sysexits code. */
int mb_status_user(const struct mb_status_job *job);

/* Implemented in C: registration with doveadm. */
void mb_shim_init(void);
void mb_shim_deinit(void);

#endif
