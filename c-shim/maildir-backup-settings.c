/* Dovecot 2.4 settings of doveadm maildir-backup. Built twice: into the settings module
   that the config process loads, and into the doveadm plugin that reads them. */

#include "lib.h"
#include "settings-parser.h"
#include "maildir-backup-settings.h"

#undef DEF
#define DEF(type, name) \
	SETTING_DEFINE_STRUCT_##type(#name, name, struct maildir_backup_settings)

static const struct setting_define maildir_backup_setting_defines[] = {
	DEF(STR, maildir_backup_dest),
	DEF(STR, maildir_backup_metrics),
	DEF(STR, maildir_backup_stage),
	DEF(STR, maildir_backup_hand_off),
	DEF(TIME, maildir_backup_lock_timeout),
	DEF(UINT, maildir_backup_jobs),
	DEF(BOOL, maildir_backup_with_indexes),
	DEF(BOOL, maildir_backup_imap_view),

	SETTING_DEFINE_LIST_END
};

static const struct maildir_backup_settings maildir_backup_default_settings = {
	.maildir_backup_dest = "",
	.maildir_backup_metrics = "",
	.maildir_backup_stage = "",
	.maildir_backup_hand_off = "",
	.maildir_backup_lock_timeout = 122,
	.maildir_backup_jobs = 4,
	.maildir_backup_with_indexes = FALSE,
	.maildir_backup_imap_view = FALSE,
};

const struct setting_parser_info maildir_backup_setting_parser_info = {
	.name = "maildir_backup",

	.defines = maildir_backup_setting_defines,
	.defaults = &maildir_backup_default_settings,

	.struct_size = sizeof(struct maildir_backup_settings),
	.pool_offset1 = 1 + offsetof(struct maildir_backup_settings, pool),
};

/* What the config process looks up in libmaildir_backup_settings.so. */
const char *maildir_backup_settings_version = DOVECOT_ABI_VERSION;
const struct setting_parser_info *maildir_backup_settings_set_infos[] = {
	&maildir_backup_setting_parser_info,
	NULL
};
