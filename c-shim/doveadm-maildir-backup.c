/* doveadm maildir-backup: registration and Dovecot calls only. The copying is done by the
   Rust core (mb_backup_user); this file finds the user's mailboxes and their paths through
   Dovecot's mailbox-list API and lends it Dovecot's own uidlist lock. Builds against
   Dovecot 2.3 and 2.4 headers. */

#include "config.h"
#include "lib.h"
#include "array.h"
#include "ioloop.h"
#include "str.h"
#include "mail-namespace.h"
#include "mail-storage-private.h"
#include "mailbox-list-private.h"
#include "mailbox-list-iter.h"
#include "maildir-storage.h"
#include "maildir-uidlist.h"
#include "doveadm.h"
#include "doveadm-cmd.h"
#include "doveadm-mail.h"
#include "doveadm-print.h"
#include "maildir-backup-shim.h"
#if DOVECOT_PREREQ(2,4,0)
#  include "settings.h"
#  include "maildir-backup-settings.h"
#endif

#ifndef DOVECOT_PREREQ
#  define DOVECOT_PREREQ(maj, min, micro) 0
#endif

/* doveadm maildir-backup and maildir-backup-hand-off: their parameters, read once in init;
   the user's settings fill in what the command line left out, in run. */
struct maildir_backup_cmd_context {
	struct doveadm_mail_cmd_context ctx;
	const char *const *patterns;
	const char *dest;         /* the stage, for a hand-off */
	const char *hand_off;     /* the hand-off's shell command */
	bool is_hand_off;
	bool keep_stage;
	bool checksum;
	double lock_timeout_secs; /* < 0: not given */
	int64_t jobs;             /* 0: not given */
	bool with_indexes;
	bool link;                /* hard-link message files instead of copying them */
	bool imap_view;           /* repo: keep the user's snapshots as IMAP folders */
	bool invalid;             /* a parameter was refused (said in init) */
};

/* What the lock and output callbacks need for one user. */
struct lock_ctx {
	struct doveadm_mail_cmd_context *cmd;
	struct mail_user *user;
	const char *const *patterns;
	/* Grown by list_boxes(); index i of each is the same mailbox. */
	ARRAY(struct mailbox *) boxes;
	ARRAY(struct mb_folder) folders;
	ARRAY(unsigned char) locked;
	/* Every name met so far, including ones that could not be used. */
	ARRAY_TYPE(const_string) seen;
	const char *username;
	int ret;
};

static struct maildir_uidlist *box_uidlist(struct mailbox *box)
{
	struct maildir_mailbox *mbox = MAILDIR_MAILBOX(box);

	return mbox->uidlist;
}

static int cb_try_lock(void *context, unsigned int i)
{
	struct lock_ctx *lc = context;
	const unsigned char one = 1;
	int ret;

	i_assert(i < array_count(&lc->boxes) && *array_idx(&lc->locked, i) == 0);
	/* Dovecot's own lock with the mailbox's own settings (stale timeout, O_EXCL,
	   NFS flushing), never waiting: the core backs off and retries. */
	ret = maildir_uidlist_try_lock(box_uidlist(array_idx_elem(&lc->boxes, i)));
	if (ret > 0)
		array_idx_set(&lc->locked, i, &one);
	return ret > 0 ? 1 : (ret == 0 ? 0 : -1);
}

static void cb_unlock(void *context, unsigned int i)
{
	struct lock_ctx *lc = context;

	const unsigned char zero = 0;

	if (*array_idx(&lc->locked, i) != 0) {
		maildir_uidlist_unlock(box_uidlist(array_idx_elem(&lc->boxes, i)));
		array_idx_set(&lc->locked, i, &zero);
	}
}

static void cb_touch(void *context, unsigned int i)
{
	struct lock_ctx *lc = context;

	if (*array_idx(&lc->locked, i) != 0)
		(void)maildir_uidlist_lock_touch(box_uidlist(array_idx_elem(&lc->boxes, i)));
}

static void cb_refresh(void *context, unsigned int i)
{
	struct lock_ctx *lc = context;

	i_assert(i < array_count(&lc->boxes));
	/* A failure shows again, and is reported, in the try_lock that follows. */
	(void)maildir_uidlist_refresh(box_uidlist(array_idx_elem(&lc->boxes, i)));
}

static void cb_row(void *context, const char *mailbox, uint64_t messages,
		   uint64_t bytes, double lock_ms, const char *status)
{
	struct lock_ctx *lc = context;

	doveadm_print(lc->username);
	doveadm_print(mailbox);
	doveadm_print_num(messages);
	doveadm_print_num(bytes);
	doveadm_print(t_strdup_printf("%.1f", lock_ms));
	doveadm_print(status);
}

static void cb_error(void *context, const char *message)
{
	struct lock_ctx *lc = context;

	i_error("maildir-backup: user %s: %s", lc->username, message);
}

static void print_failed_box(const char *username, const char *vname, const char *why)
{
	doveadm_print(username);
	doveadm_print(vname);
	doveadm_print("0");
	doveadm_print("0");
	doveadm_print("0");
	doveadm_print(why);
}

/* Seconds, fractions allowed; -1 if str is not a non-negative number. */
static int parse_secs(const char *str, double *secs_r)
{
	char *end;

	*secs_r = strtod(str, &end);
	return (*end != '\0' || end == str || *secs_r < 0) ? -1 : 0;
}

/* The plugin's settings from dovecot.conf, as strings (NULL: not set). */
struct backup_settings {
	const char *dest, *lock_timeout, *jobs, *metrics, *stage, *hand_off;
	bool with_indexes, imap_view;
};

static int get_settings(struct mail_user *user, struct backup_settings *set_r)
{
#if DOVECOT_PREREQ(2,4,0)
	const struct maildir_backup_settings *set;
	const char *error;

	i_zero(set_r);
	if (settings_get(user->event, &maildir_backup_setting_parser_info, 0,
			 &set, &error) < 0) {
		/* Without our settings module Dovecot knows no maildir_backup_* keys
		   (and then dovecot.conf cannot set any): run with the defaults. */
		if (strstr(error, "has no settings struct named") != NULL) {
			i_warning("maildir-backup: Dovecot's configuration has no maildir_backup "
				  "settings, so the defaults are used: install "
				  "libmaildir_backup_settings.so into %s/settings/ to set them "
				  "in dovecot.conf", MB_MODULEDIR);
			return 0;
		}
		i_error("maildir-backup: settings: %s", error);
		return -1;
	}
	set_r->dest = set->maildir_backup_dest[0] == '\0' ? NULL :
		t_strdup(set->maildir_backup_dest);
	set_r->lock_timeout = dec2str(set->maildir_backup_lock_timeout);
	set_r->jobs = dec2str(set->maildir_backup_jobs);
	set_r->metrics = set->maildir_backup_metrics[0] == '\0' ? NULL :
		t_strdup(set->maildir_backup_metrics);
	set_r->stage = set->maildir_backup_stage[0] == '\0' ? NULL :
		t_strdup(set->maildir_backup_stage);
	set_r->hand_off = set->maildir_backup_hand_off[0] == '\0' ? NULL :
		t_strdup(set->maildir_backup_hand_off);
	set_r->with_indexes = set->maildir_backup_with_indexes;
	set_r->imap_view = set->maildir_backup_imap_view;
	settings_free(set);
#else
	const char *value;

	set_r->dest = mail_user_plugin_getenv(user, "maildir_backup_dest");
	set_r->lock_timeout = mail_user_plugin_getenv(user, "maildir_backup_lock_timeout");
	set_r->jobs = mail_user_plugin_getenv(user, "maildir_backup_jobs");
	set_r->metrics = mail_user_plugin_getenv(user, "maildir_backup_metrics");
	set_r->stage = mail_user_plugin_getenv(user, "maildir_backup_stage");
	set_r->hand_off = mail_user_plugin_getenv(user, "maildir_backup_hand_off");
	value = mail_user_plugin_getenv(user, "maildir_backup_with_indexes");
	set_r->with_indexes = value != NULL &&
		(strcasecmp(value, "yes") == 0 || strcmp(value, "1") == 0);
	value = mail_user_plugin_getenv(user, "maildir_backup_imap_view");
	set_r->imap_view = value != NULL &&
		(strcasecmp(value, "yes") == 0 || strcmp(value, "1") == 0);
#endif
	return 0;
}

/* The user's Maildir root and, when they live elsewhere, its control and index roots. */
static int get_roots(struct mail_user *user, struct mail_namespace **ns_r,
		     const char **root_r, const char **control_r, const char **index_r)
{
	struct mail_namespace *ns = mail_namespace_find_inbox(user->namespaces);

	if (ns == NULL ||
	    !mailbox_list_get_root_path(ns->list, MAILBOX_LIST_PATH_TYPE_MAILBOX, root_r)) {
		i_error("maildir-backup: user %s has no INBOX namespace with a mail root",
			user->username);
		return -1;
	}
	if (!mailbox_list_get_root_path(ns->list, MAILBOX_LIST_PATH_TYPE_CONTROL, control_r) ||
	    strcmp(*control_r, *root_r) == 0)
		*control_r = NULL;
	if (!mailbox_list_get_root_path(ns->list, MAILBOX_LIST_PATH_TYPE_INDEX, index_r) ||
	    strcmp(*index_r, *root_r) == 0)
		*index_r = NULL;
	*ns_r = ns;
	return 0;
}

static bool seen_name(struct lock_ctx *lc, const char *vname)
{
	const char *name;

	array_foreach_elem(&lc->seen, name) {
		if (strcmp(name, vname) == 0)
			return TRUE;
	}
	return FALSE;
}

/* Adds the mailboxes not met before. */
static void list_boxes(struct lock_ctx *lc)
{
	struct doveadm_mail_cmd_context *ctx = lc->cmd;
	struct mailbox_list_iterate_context *iter;
	const struct mailbox_info *info;
	const unsigned char zero = 0;
	struct mailbox *box;

	iter = mailbox_list_iter_init_namespaces(lc->user->namespaces, lc->patterns,
						 MAIL_NAMESPACE_TYPE_PRIVATE,
						 MAILBOX_LIST_ITER_RETURN_NO_FLAGS |
						 MAILBOX_LIST_ITER_SKIP_ALIASES);
	while ((info = mailbox_list_iter_next(iter)) != NULL) {
		struct mb_folder *f;
		const char *path, *vname;

		if ((info->flags & (MAILBOX_NOSELECT | MAILBOX_NONEXISTENT)) != 0 ||
		    seen_name(lc, info->vname))
			continue;
		vname = p_strdup(ctx->pool, info->vname);
		array_push_back(&lc->seen, &vname);
		box = mailbox_alloc(info->ns->list, info->vname, 0);
		if (mailbox_open(box) < 0) {
			enum mail_error error;
			const char *errstr = mailbox_get_last_internal_error(box, &error);

			mailbox_free(&box);
			if (error == MAIL_ERROR_NOTFOUND)
				continue; /* gone again (renamed or deleted meanwhile) */
			i_error("maildir-backup: user %s: open mailbox %s: %s",
				lc->username, vname, errstr);
			print_failed_box(lc->username, vname, errstr);
			doveadm_mail_failed_error(ctx, error);
			lc->ret = -1;
			continue;
		}
		if (strcmp(box->storage->name, MAILDIR_STORAGE_NAME) != 0) {
			const char *why = t_strdup_printf(
				"not a Maildir mailbox (storage %s); maildir-backup only copies Maildir",
				box->storage->name);
			i_error("maildir-backup: user %s: mailbox %s: %s",
				lc->username, vname, why);
			print_failed_box(lc->username, vname, why);
			ctx->exit_code = EX_DATAERR;
			mailbox_free(&box);
			lc->ret = -1;
			continue;
		}
		f = array_append_space(&lc->folders);
		f->vname = vname;
		if (mailbox_get_path_to(box, MAILBOX_LIST_PATH_TYPE_MAILBOX, &path) > 0)
			f->mail_dir = p_strdup(ctx->pool, path);
		if (mailbox_get_path_to(box, MAILBOX_LIST_PATH_TYPE_CONTROL, &path) > 0)
			f->control_dir = p_strdup(ctx->pool, path);
		if (mailbox_get_path_to(box, MAILBOX_LIST_PATH_TYPE_INDEX, &path) > 0)
			f->index_dir = p_strdup(ctx->pool, path);
		array_push_back(&lc->boxes, &box);
		array_push_back(&lc->locked, &zero);
	}
	if (mailbox_list_iter_deinit(&iter) < 0) {
		i_error("maildir-backup: user %s: listing mailboxes failed", lc->username);
		doveadm_mail_failed_error(ctx, MAIL_ERROR_TEMP);
		lc->ret = -1;
	}
}

static int cb_relist(void *context, const struct mb_folder **folders_r, unsigned int *count_r)
{
	struct lock_ctx *lc = context;

	/* The mailbox list index is refreshed at most once per ioloop time, which does not
	   advance while we run: advance it, or we get the cached list of our first call. */
	io_loop_time_refresh();
	T_BEGIN {
		list_boxes(lc);
	} T_END;
	*folders_r = array_get(&lc->folders, count_r);
	return 0;
}

/* The command line wins over the user's settings. */
static int merge_settings(struct maildir_backup_cmd_context *bctx, struct mail_user *user,
			  struct mb_user_job *job)
{
	struct backup_settings set;
	int64_t jobs = bctx->jobs;

	if (get_settings(user, &set) < 0)
		return -1;
	if (bctx->is_hand_off) {
		job->dest_template = bctx->dest != NULL ? bctx->dest : set.stage;
		job->hand_off = bctx->hand_off != NULL ? bctx->hand_off : set.hand_off;
		if (job->hand_off == NULL) {
			i_error("maildir-backup-hand-off: no command: give one or set "
				"maildir_backup_hand_off");
			bctx->invalid = TRUE;
			return -1;
		}
	} else {
		job->dest_template = bctx->dest != NULL ? bctx->dest : set.dest;
	}
	job->lock_timeout_secs = bctx->lock_timeout_secs;
	if (job->lock_timeout_secs < 0 && set.lock_timeout != NULL &&
	    parse_secs(set.lock_timeout, &job->lock_timeout_secs) < 0) {
		i_error("maildir-backup: invalid maildir_backup_lock_timeout: %s", set.lock_timeout);
		return -1;
	}
	if (jobs == 0 && set.jobs != NULL && str_to_int64(set.jobs, &jobs) < 0) {
		i_error("maildir-backup: invalid maildir_backup_jobs: %s", set.jobs);
		return -1;
	}
	job->jobs = jobs > 0 ? (unsigned int)jobs : 0;
	job->with_indexes = bctx->with_indexes || set.with_indexes ? 1 : 0;
	job->link = bctx->link ? 1 : 0;
	job->imap_view = bctx->imap_view || set.imap_view ? 1 : 0;
	job->checksum = bctx->checksum ? 1 : 0;
	job->keep_stage = bctx->keep_stage ? 1 : 0;
	job->metrics_file = set.metrics;
	return 0;
}

static void lock_ctx_init(struct lock_ctx *lc, struct doveadm_mail_cmd_context *ctx,
			  struct mail_user *user, const char *const *patterns)
{
	i_zero(lc);
	lc->cmd = ctx;
	lc->user = user;
	lc->patterns = patterns;
	lc->username = user->username;
	i_array_init(&lc->boxes, 16);
	i_array_init(&lc->folders, 16);
	i_array_init(&lc->locked, 16);
	i_array_init(&lc->seen, 16);
}

static void lock_ctx_deinit(struct lock_ctx *lc)
{
	struct mailbox *box;

	for (unsigned int i = 0; i < array_count(&lc->boxes); i++)
		cb_unlock(lc, i);
	array_foreach_elem(&lc->boxes, box)
		mailbox_free(&box);
	array_free(&lc->boxes);
	array_free(&lc->folders);
	array_free(&lc->locked);
	array_free(&lc->seen);
}

static int
cmd_maildir_backup_run(struct doveadm_mail_cmd_context *ctx, struct mail_user *user)
{
	struct maildir_backup_cmd_context *bctx =
		container_of(ctx, struct maildir_backup_cmd_context, ctx);
	struct mail_namespace *inbox_ns;
	struct mb_user_job job;
	struct lock_ctx lc;
	const char *root, *control_root, *index_root;
	int ret, code;

	i_zero(&job);
	if (bctx->invalid) {
		ctx->exit_code = EX_USAGE;
		return -1;
	}
	if (merge_settings(bctx, user, &job) < 0 ||
	    get_roots(user, &inbox_ns, &root, &control_root, &index_root) < 0) {
		ctx->exit_code = bctx->invalid ? EX_USAGE : EX_CONFIG;
		return -1;
	}
	lock_ctx_init(&lc, ctx, user, bctx->patterns);
	list_boxes(&lc);
	ret = lc.ret;

	job.username = user->username;
	job.root_dir = root;
	job.control_root = control_root;
	job.index_root = index_root;
	job.layout = inbox_ns->list->name;
	job.folders = array_get(&lc.folders, &job.folder_count);
	job.ctx = &lc;
	job.try_lock = cb_try_lock;
	job.unlock = cb_unlock;
	job.touch = cb_touch;
	job.refresh = cb_refresh;
	job.row = cb_row;
	job.error = cb_error;
	job.relist = cb_relist;

	code = mb_backup_user(&job);
	if (code != 0) {
		ctx->exit_code = code;
		ret = -1;
	}
	lock_ctx_deinit(&lc);
	return ret;
}

/* v.init lost its args parameter in 2.4. */
#if DOVECOT_PREREQ(2,4,0)
#  define INIT_PARAMS struct doveadm_mail_cmd_context *ctx
#else
#  define INIT_PARAMS struct doveadm_mail_cmd_context *ctx, \
	const char *const args[] ATTR_UNUSED
#endif

/* The parameters both commands have, and their output's header. */
static void init_common(struct doveadm_mail_cmd_context *ctx)
{
	struct maildir_backup_cmd_context *bctx =
		container_of(ctx, struct maildir_backup_cmd_context, ctx);
	static const char *const all[] = { "*", NULL };
	const char *timeout_str = NULL;

	bctx->patterns = all;
	bctx->lock_timeout_secs = -1;
	(void)doveadm_cmd_param_array(ctx->cctx, "mailbox", &bctx->patterns);
	(void)doveadm_cmd_param_int64(ctx->cctx, "jobs", &bctx->jobs);
	(void)doveadm_cmd_param_bool(ctx->cctx, "with-indexes", &bctx->with_indexes);
	if (doveadm_cmd_param_str(ctx->cctx, "lock-timeout", &timeout_str) &&
	    parse_secs(timeout_str, &bctx->lock_timeout_secs) < 0) {
		i_error("maildir-backup: invalid lock timeout: %s", timeout_str);
		bctx->invalid = TRUE;
	}

	doveadm_print_header_simple("user");
	doveadm_print_header_simple("mailbox");
	doveadm_print_header("messages", "messages", DOVEADM_PRINT_HEADER_FLAG_RIGHT_JUSTIFY);
	doveadm_print_header("bytes", "bytes", DOVEADM_PRINT_HEADER_FLAG_RIGHT_JUSTIFY);
	doveadm_print_header("lock_ms", "lock_ms", DOVEADM_PRINT_HEADER_FLAG_RIGHT_JUSTIFY);
	doveadm_print_header_simple("status");
}

static void cmd_maildir_backup_init(INIT_PARAMS)
{
	struct maildir_backup_cmd_context *bctx =
		container_of(ctx, struct maildir_backup_cmd_context, ctx);

	init_common(ctx);
	(void)doveadm_cmd_param_str(ctx->cctx, "destination", &bctx->dest);
	(void)doveadm_cmd_param_bool(ctx->cctx, "link", &bctx->link);
	(void)doveadm_cmd_param_bool(ctx->cctx, "imap-view", &bctx->imap_view);
}

static void cmd_maildir_backup_hand_off_init(INIT_PARAMS)
{
	struct maildir_backup_cmd_context *bctx =
		container_of(ctx, struct maildir_backup_cmd_context, ctx);

	init_common(ctx);
	bctx->is_hand_off = TRUE;
	(void)doveadm_cmd_param_str(ctx->cctx, "stage", &bctx->dest);
	(void)doveadm_cmd_param_str(ctx->cctx, "command", &bctx->hand_off);
	(void)doveadm_cmd_param_bool(ctx->cctx, "keep-stage", &bctx->keep_stage);
	(void)doveadm_cmd_param_bool(ctx->cctx, "checksum", &bctx->checksum);
}

#if !DOVECOT_PREREQ(2,4,0)
/* 2.3 passes every short option through parse_arg; values are read from cctx in init(). */
static bool cmd_maildir_backup_parse_arg(struct doveadm_mail_cmd_context *ctx ATTR_UNUSED,
					 int c ATTR_UNUSED)
{
	return TRUE;
}
#endif

/* What every command's alloc sets up: its init and run, 2.3's short options, a table. */
static struct doveadm_mail_cmd_context *
cmd_setup(struct doveadm_mail_cmd_context *ctx, __typeof__(ctx->v.init) init,
	  __typeof__(ctx->v.run) run, const char *getopt_args ATTR_UNUSED)
{
	ctx->v.init = init;
	ctx->v.run = run;
#if !DOVECOT_PREREQ(2,4,0)
	ctx->v.parse_arg = cmd_maildir_backup_parse_arg;
	ctx->getopt_args = getopt_args;
#endif
	doveadm_print_init(DOVEADM_PRINT_TYPE_TABLE);
	return ctx;
}

static struct doveadm_mail_cmd_context *cmd_maildir_backup_alloc(void)
{
	struct maildir_backup_cmd_context *bctx =
		doveadm_mail_cmd_alloc(struct maildir_backup_cmd_context);

	return cmd_setup(&bctx->ctx, cmd_maildir_backup_init, cmd_maildir_backup_run, "m:t:j:iLV");
}

/* The parameters both commands read in init_common(). */
#define MB_BACKUP_PARAMS \
DOVEADM_CMD_PARAM('m', "mailbox", CMD_PARAM_ARRAY, 0) \
DOVEADM_CMD_PARAM('t', "lock-timeout", CMD_PARAM_STR, 0) \
DOVEADM_CMD_PARAM('j', "jobs", CMD_PARAM_INT64, 0) \
DOVEADM_CMD_PARAM('i', "with-indexes", CMD_PARAM_BOOL, 0)

static struct doveadm_cmd_ver2 maildir_backup_cmd = {
	.name = "maildir-backup",
	.mail_cmd = cmd_maildir_backup_alloc,
	.usage = DOVEADM_CMD_MAIL_USAGE_PREFIX
		"[-m <mailbox>]... [-t <lock timeout secs>] [-j <jobs>] [-i] [-L] [-V] [<destination template>]",
DOVEADM_CMD_PARAMS_START
DOVEADM_CMD_MAIL_COMMON
MB_BACKUP_PARAMS
DOVEADM_CMD_PARAM('L', "link", CMD_PARAM_BOOL, 0)
DOVEADM_CMD_PARAM('V', "imap-view", CMD_PARAM_BOOL, 0)
DOVEADM_CMD_PARAM('\0', "destination", CMD_PARAM_STR, CMD_PARAM_FLAG_POSITIONAL)
DOVEADM_CMD_PARAMS_END
};

/* doveadm maildir-backup-hand-off: a link snapshot at a stage per user, handed to the
   admin's restic or borg command. */

static struct doveadm_mail_cmd_context *cmd_maildir_backup_hand_off_alloc(void)
{
	struct maildir_backup_cmd_context *bctx =
		doveadm_mail_cmd_alloc(struct maildir_backup_cmd_context);

	return cmd_setup(&bctx->ctx, cmd_maildir_backup_hand_off_init, cmd_maildir_backup_run,
			 "m:t:j:is:Kc");
}

static struct doveadm_cmd_ver2 maildir_backup_hand_off_cmd = {
	.name = "maildir-backup-hand-off",
	.mail_cmd = cmd_maildir_backup_hand_off_alloc,
	.usage = DOVEADM_CMD_MAIL_USAGE_PREFIX
		"[-m <mailbox>]... [-t <lock timeout secs>] [-j <jobs>] [-i] [-s <stage template>] [-K] [-c] [<shell command>]",
DOVEADM_CMD_PARAMS_START
DOVEADM_CMD_MAIL_COMMON
MB_BACKUP_PARAMS
DOVEADM_CMD_PARAM('s', "stage", CMD_PARAM_STR, 0)
DOVEADM_CMD_PARAM('K', "keep-stage", CMD_PARAM_BOOL, 0)
DOVEADM_CMD_PARAM('c', "checksum", CMD_PARAM_BOOL, 0)
DOVEADM_CMD_PARAM('\0', "command", CMD_PARAM_STR, CMD_PARAM_FLAG_POSITIONAL)
DOVEADM_CMD_PARAMS_END
};

/* doveadm maildir-backup-restore */

/* What a restore's or a status's row and error callbacks need. */
struct user_row_ctx {
	const char *username;
};

static void cb_restore_row(void *context, const char *mode, uint64_t restored,
			   uint64_t skipped, const char *status)
{
	struct user_row_ctx *rc = context;

	doveadm_print(rc->username);
	doveadm_print(mode);
	doveadm_print_num(restored);
	doveadm_print_num(skipped);
	doveadm_print(status);
}

static void cb_restore_error(void *context, const char *message)
{
	struct user_row_ctx *rc = context;

	i_error("maildir-backup-restore: user %s: %s", rc->username, message);
}

/* doveadm maildir-backup-restore: its parameters, read once in init. */
struct restore_cmd_context {
	struct doveadm_mail_cmd_context ctx;
	const char *snapshot;
	const char *const *folders, *const *messages, *const *uids;
	bool dry_run;
};

static int
cmd_maildir_backup_restore_run(struct doveadm_mail_cmd_context *ctx, struct mail_user *user)
{
	struct restore_cmd_context *rctx =
		container_of(ctx, struct restore_cmd_context, ctx);
	struct mb_restore_job job;
	struct user_row_ctx rc;
	struct mail_namespace *ns;
	const char *root, *control_root, *index_root;
	int code;

	if (rctx->snapshot == NULL) {
		i_error("maildir-backup-restore: no snapshot given");
		ctx->exit_code = EX_USAGE;
		return -1;
	}
	if (get_roots(user, &ns, &root, &control_root, &index_root) < 0) {
		ctx->exit_code = EX_CONFIG;
		return -1;
	}
	i_zero(&job);
	rc.username = user->username;
	job.username = user->username;
	job.snapshot_template = rctx->snapshot;
	job.folders = rctx->folders;
	job.messages = rctx->messages;
	job.uids = rctx->uids;
	job.dry_run = rctx->dry_run ? 1 : 0;
	job.root_dir = root;
	job.control_root = control_root;
	job.index_root = index_root;
	job.layout = ns->list->name;
	job.ctx = &rc;
	job.row = cb_restore_row;
	job.error = cb_restore_error;
	code = mb_restore_user(&job);
	if (code != 0) {
		ctx->exit_code = code;
		return -1;
	}
	return 0;
}

static void cmd_maildir_backup_restore_init(INIT_PARAMS)
{
	struct restore_cmd_context *rctx =
		container_of(ctx, struct restore_cmd_context, ctx);

	(void)doveadm_cmd_param_str(ctx->cctx, "snapshot", &rctx->snapshot);
	(void)doveadm_cmd_param_array(ctx->cctx, "folder", &rctx->folders);
	(void)doveadm_cmd_param_array(ctx->cctx, "message", &rctx->messages);
	(void)doveadm_cmd_param_array(ctx->cctx, "uid", &rctx->uids);
	(void)doveadm_cmd_param_bool(ctx->cctx, "dry-run", &rctx->dry_run);

	doveadm_print_header_simple("user");
	doveadm_print_header_simple("mode");
	doveadm_print_header("restored", "restored", DOVEADM_PRINT_HEADER_FLAG_RIGHT_JUSTIFY);
	doveadm_print_header("skipped", "skipped", DOVEADM_PRINT_HEADER_FLAG_RIGHT_JUSTIFY);
	doveadm_print_header_simple("status");
}

static struct doveadm_mail_cmd_context *cmd_maildir_backup_restore_alloc(void)
{
	struct restore_cmd_context *rctx = doveadm_mail_cmd_alloc(struct restore_cmd_context);

	return cmd_setup(&rctx->ctx, cmd_maildir_backup_restore_init,
			 cmd_maildir_backup_restore_run, "m:g:U:n");
}

static struct doveadm_cmd_ver2 maildir_backup_restore_cmd = {
	.name = "maildir-backup-restore",
	.mail_cmd = cmd_maildir_backup_restore_alloc,
	.usage = DOVEADM_CMD_MAIL_USAGE_PREFIX
		"[-m <folder>]... [-g <unique name>]... [-U <folder>:<uid>]... [-n] <snapshot | repo:REPO>",
DOVEADM_CMD_PARAMS_START
DOVEADM_CMD_MAIL_COMMON
DOVEADM_CMD_PARAM('m', "folder", CMD_PARAM_ARRAY, 0)
DOVEADM_CMD_PARAM('g', "message", CMD_PARAM_ARRAY, 0)
DOVEADM_CMD_PARAM('U', "uid", CMD_PARAM_ARRAY, 0)
DOVEADM_CMD_PARAM('n', "dry-run", CMD_PARAM_BOOL, 0)
DOVEADM_CMD_PARAM('\0', "snapshot", CMD_PARAM_STR, CMD_PARAM_FLAG_POSITIONAL)
DOVEADM_CMD_PARAMS_END
};

/* doveadm maildir-backup-status: a user's last backup run into a repository, as recorded
   there, failed or not. Its exit code says only whether the record could be read, so that
   the HTTP API, which answers a failed command with its exit code alone, carries a failed
   backup's reason here. */

struct status_cmd_context {
	struct doveadm_mail_cmd_context ctx;
	const char *repo;
};

static void cb_status_row(void *context, const char *result, const char *started,
			  const char *finished, int exit_code, const char *snapshot,
			  const char *error)
{
	struct user_row_ctx *rc = context;

	doveadm_print(rc->username);
	doveadm_print(result);
	doveadm_print(started);
	doveadm_print(finished);
	doveadm_print(dec2str(exit_code));
	doveadm_print(snapshot);
	doveadm_print(error);
}

static void cb_status_error(void *context, const char *message)
{
	struct user_row_ctx *rc = context;

	i_error("maildir-backup-status: user %s: %s", rc->username, message);
}

static int
cmd_maildir_backup_status_run(struct doveadm_mail_cmd_context *ctx, struct mail_user *user)
{
	struct status_cmd_context *sctx = container_of(ctx, struct status_cmd_context, ctx);
	struct backup_settings set;
	struct mb_status_job job;
	struct user_row_ctx rc;
	int code;

	i_zero(&set);
	if (sctx->repo == NULL && get_settings(user, &set) < 0) {
		ctx->exit_code = EX_CONFIG;
		return -1;
	}
	i_zero(&job);
	job.username = user->username;
	job.repo_template = sctx->repo != NULL ? sctx->repo : set.dest;
	rc.username = user->username;
	job.ctx = &rc;
	job.row = cb_status_row;
	job.error = cb_status_error;
	code = mb_status_user(&job);
	if (code != 0) {
		ctx->exit_code = code;
		return -1;
	}
	return 0;
}

static void cmd_maildir_backup_status_init(INIT_PARAMS)
{
	struct status_cmd_context *sctx = container_of(ctx, struct status_cmd_context, ctx);

	(void)doveadm_cmd_param_str(ctx->cctx, "repository", &sctx->repo);
	doveadm_print_header_simple("user");
	doveadm_print_header_simple("result");
	doveadm_print_header_simple("started");
	doveadm_print_header_simple("finished");
	doveadm_print_header_simple("exit_code");
	doveadm_print_header_simple("snapshot");
	doveadm_print_header_simple("error");
}

static struct doveadm_mail_cmd_context *cmd_maildir_backup_status_alloc(void)
{
	struct status_cmd_context *sctx = doveadm_mail_cmd_alloc(struct status_cmd_context);

	return cmd_setup(&sctx->ctx, cmd_maildir_backup_status_init,
			 cmd_maildir_backup_status_run, "");
}

static struct doveadm_cmd_ver2 maildir_backup_status_cmd = {
	.name = "maildir-backup-status",
	.mail_cmd = cmd_maildir_backup_status_alloc,
	.usage = DOVEADM_CMD_MAIL_USAGE_PREFIX "[repo:REPO]",
DOVEADM_CMD_PARAMS_START
DOVEADM_CMD_MAIL_COMMON
DOVEADM_CMD_PARAM('\0', "repository", CMD_PARAM_STR, CMD_PARAM_FLAG_POSITIONAL)
DOVEADM_CMD_PARAMS_END
};

void mb_shim_init(void)
{
	doveadm_cmd_register_ver2(&maildir_backup_cmd);
	doveadm_cmd_register_ver2(&maildir_backup_hand_off_cmd);
	doveadm_cmd_register_ver2(&maildir_backup_restore_cmd);
	doveadm_cmd_register_ver2(&maildir_backup_status_cmd);
}

void mb_shim_deinit(void)
{
}
