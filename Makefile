# Build, install and uninstall maildir-backup: the CLI, the doveadm plugin and its config
# example (and on Dovecot 2.4 the settings module that registers maildir_backup_* keys).
#   make && sudo make install        sudo make uninstall        make test
# DOVECOT_CONFIG=/path/to/dovecot-config builds against another Dovecot (e.g. a Debian 13 root).

PREFIX        ?= /usr/local
DESTDIR       ?=
DOVECOT_CONFIG ?= /usr/lib/dovecot/dovecot-config
CONFDIR       ?= /etc/dovecot/conf.d
CARGO         ?= cargo

MODULEDIR := $(shell sed -n 's/^dovecot_moduledir=//p' $(DOVECOT_CONFIG) 2>/dev/null)
INCDIR    := $(shell sed -n 's/^dovecot_pkgincludedir=//p' $(DOVECOT_CONFIG) 2>/dev/null)
RELEASE   := $(shell sed -n 's/^\#define DOVECOT_VERSION_MINOR //p' $(dir $(DOVECOT_CONFIG))/../../include/dovecot/config.h $(INCDIR)/config.h 2>/dev/null | head -1)
PLUGIN    := lib20_doveadm_maildir_backup_plugin.so
SETTINGS  := libmaildir_backup_settings.so
PLUGIN_TARGET := target/plugin

ifeq ($(RELEASE),4)
CONF_EXAMPLE := dovecot-conf/2.4/95-maildir-backup.conf
else
CONF_EXAMPLE := dovecot-conf/2.3/95-maildir-backup.conf
endif

.PHONY: all cli plugin install uninstall test clean

all: cli plugin

cli:
	$(CARGO) build --release --bin maildir-backup

plugin:
	DOVECOT_CONFIG=$(DOVECOT_CONFIG) $(CARGO) build --release --lib --features doveadm-plugin --target-dir $(PLUGIN_TARGET)

install: all
	@test -n "$(MODULEDIR)" || { echo "no dovecot_moduledir in $(DOVECOT_CONFIG): install dovecot-dev"; exit 1; }
	install -D -m 0755 target/release/maildir-backup $(DESTDIR)$(PREFIX)/bin/maildir-backup
	install -D -m 0644 $(PLUGIN_TARGET)/release/libmaildir_backup.so $(DESTDIR)$(MODULEDIR)/doveadm/$(PLUGIN)
	if [ -f $(PLUGIN_TARGET)/release/$(SETTINGS) ] && [ "$(RELEASE)" = 4 ]; then \
		install -D -m 0644 $(PLUGIN_TARGET)/release/$(SETTINGS) $(DESTDIR)$(MODULEDIR)/settings/$(SETTINGS); fi
	if [ -d $(DESTDIR)$(CONFDIR) ] && [ ! -e $(DESTDIR)$(CONFDIR)/95-maildir-backup.conf ]; then \
		install -m 0644 $(CONF_EXAMPLE) $(DESTDIR)$(CONFDIR)/95-maildir-backup.conf; fi

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/maildir-backup
	rm -f $(DESTDIR)$(MODULEDIR)/doveadm/$(PLUGIN) $(DESTDIR)$(MODULEDIR)/settings/$(SETTINGS)
	@# Only remove the config file if it is still our unmodified example.
	if [ -f $(DESTDIR)$(CONFDIR)/95-maildir-backup.conf ] && cmp -s $(CONF_EXAMPLE) $(DESTDIR)$(CONFDIR)/95-maildir-backup.conf; then \
		rm -f $(DESTDIR)$(CONFDIR)/95-maildir-backup.conf; fi

test:
	bash scripts/test.sh

clean:
	$(CARGO) clean
