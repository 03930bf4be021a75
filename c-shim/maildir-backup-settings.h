/* Dovecot 2.4: the plugin's settings, registered with the config process by the settings
   module (libmaildir_backup_settings.so in $moduledir/settings) so dovecot.conf accepts
   maildir_backup_* and `doveadm -o` overrides them. */
#ifndef MAILDIR_BACKUP_SETTINGS_H
#define MAILDIR_BACKUP_SETTINGS_H

struct maildir_backup_settings {
	pool_t pool;
	const char *maildir_backup_dest;
	const char *maildir_backup_metrics;
	const char *maildir_backup_stage;
	const char *maildir_backup_hand_off;
	unsigned int maildir_backup_lock_timeout;
	unsigned int maildir_backup_jobs;
	bool maildir_backup_with_indexes;
	bool maildir_backup_imap_view;
};

extern const struct setting_parser_info maildir_backup_setting_parser_info;

#endif
