# Build, install and uninstall maildir-backup: the CLI, the doveadm plugin and its config
# example (and on Dovecot 2.4 the settings module that registers maildir_backup_* keys), man
# pages, shell completions and the systemd units; or build the Debian package of all that.
#   make && sudo make install        sudo make uninstall        make test
#   make deb                         (target/deb/maildir-backup_<version>_<arch>.deb)
# DOVECOT_CONFIG=/path/to/dovecot-config builds against another Dovecot (e.g. a Debian 13 root).

PREFIX        ?= /usr/local
DESTDIR       ?=
DOVECOT_CONFIG ?= /usr/lib/dovecot/dovecot-config
CONFDIR       ?= /etc/dovecot/conf.d
MANDIR        ?= $(PREFIX)/share/man
SHAREDIR      ?= $(PREFIX)/share
SYSTEMDDIR    ?= /etc/systemd/system
DEFAULTDIR    ?= /etc/default
DOVEADM       ?= /usr/bin/doveadm
CARGO         ?= cargo

MODULEDIR := $(shell sed -n 's/^dovecot_moduledir=//p' $(DOVECOT_CONFIG) 2>/dev/null)
INCDIR    := $(shell sed -n 's/^dovecot_pkgincludedir=//p' $(DOVECOT_CONFIG) 2>/dev/null)
RELEASE   := $(shell sed -n 's/^\#define DOVECOT_VERSION_MINOR //p' $(dir $(DOVECOT_CONFIG))/../../include/dovecot/config.h $(INCDIR)/config.h 2>/dev/null | head -1)
PLUGIN    := lib20_doveadm_maildir_backup_plugin.so
SETTINGS  := libmaildir_backup_settings.so
# One target dir per Dovecot release: building for the other one does not undo this one.
PLUGIN_TARGET := target/plugin-2.$(RELEASE)
DOCS          := target/docs
DEB_SUFFIX    := $(if $(filter 4,$(RELEASE)),~deb13,~deb12)

ifeq ($(RELEASE),4)
CONF_EXAMPLE := dovecot-conf/2.4/95-maildir-backup.conf
else
CONF_EXAMPLE := dovecot-conf/2.3/95-maildir-backup.conf
endif

.PHONY: all cli plugin docs install uninstall deb test clean

all: cli plugin

cli:
	$(CARGO) build --release --bin maildir-backup

plugin:
	DOVECOT_CONFIG=$(DOVECOT_CONFIG) $(CARGO) build --release --lib --features doveadm-plugin --target-dir $(PLUGIN_TARGET)

# Man pages and completions from the CLI's own argument definitions.
docs: cli
	rm -rf $(DOCS)
	target/release/maildir-backup generate-docs $(DOCS)

install: all docs
	@test -n "$(MODULEDIR)" || { echo "no dovecot_moduledir in $(DOVECOT_CONFIG): install dovecot-dev"; exit 1; }
	install -D -m 0755 target/release/maildir-backup $(DESTDIR)$(PREFIX)/bin/maildir-backup
	install -d $(DESTDIR)$(MANDIR)/man1
	install -m 0644 $(DOCS)/man/*.1 $(DESTDIR)$(MANDIR)/man1/
	install -D -m 0644 $(DOCS)/completions/maildir-backup.bash $(DESTDIR)$(SHAREDIR)/bash-completion/completions/maildir-backup
	install -D -m 0644 $(DOCS)/completions/_maildir-backup $(DESTDIR)$(SHAREDIR)/zsh/vendor-completions/_maildir-backup
	install -D -m 0644 $(DOCS)/completions/maildir-backup.fish $(DESTDIR)$(SHAREDIR)/fish/vendor_completions.d/maildir-backup.fish
	install -d $(DESTDIR)$(SYSTEMDDIR)
	sed -e 's|@BINDIR@|$(PREFIX)/bin|g' -e 's|@DOVEADM@|$(DOVEADM)|g' -e 's|@DEFAULTDIR@|$(DEFAULTDIR)|g' \
		dist/systemd/maildir-backup.service.in > $(DESTDIR)$(SYSTEMDDIR)/maildir-backup.service
	install -m 0644 dist/systemd/maildir-backup.timer $(DESTDIR)$(SYSTEMDDIR)/maildir-backup.timer
	if [ ! -e $(DESTDIR)$(DEFAULTDIR)/maildir-backup ]; then \
		install -D -m 0644 dist/default.maildir-backup $(DESTDIR)$(DEFAULTDIR)/maildir-backup; fi
	install -D -m 0644 $(PLUGIN_TARGET)/release/libmaildir_backup.so $(DESTDIR)$(MODULEDIR)/doveadm/$(PLUGIN)
	if [ -f $(PLUGIN_TARGET)/release/$(SETTINGS) ] && [ "$(RELEASE)" = 4 ]; then \
		install -D -m 0644 $(PLUGIN_TARGET)/release/$(SETTINGS) $(DESTDIR)$(MODULEDIR)/settings/$(SETTINGS); fi
	if [ -d $(DESTDIR)$(CONFDIR) ] && [ ! -e $(DESTDIR)$(CONFDIR)/95-maildir-backup.conf ]; then \
		install -m 0644 $(CONF_EXAMPLE) $(DESTDIR)$(CONFDIR)/95-maildir-backup.conf; fi

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/maildir-backup $(DESTDIR)$(MANDIR)/man1/maildir-backup*.1 $(DESTDIR)$(MANDIR)/man1/doveadm-maildir-backup*.1
	rm -f $(DESTDIR)$(SHAREDIR)/bash-completion/completions/maildir-backup $(DESTDIR)$(SHAREDIR)/zsh/vendor-completions/_maildir-backup
	rm -f $(DESTDIR)$(SHAREDIR)/fish/vendor_completions.d/maildir-backup.fish
	rm -f $(DESTDIR)$(SYSTEMDDIR)/maildir-backup.service $(DESTDIR)$(SYSTEMDDIR)/maildir-backup.timer
	if [ -f $(DESTDIR)$(DEFAULTDIR)/maildir-backup ] && cmp -s dist/default.maildir-backup $(DESTDIR)$(DEFAULTDIR)/maildir-backup; then \
		rm -f $(DESTDIR)$(DEFAULTDIR)/maildir-backup; fi
	rm -f $(DESTDIR)$(MODULEDIR)/doveadm/$(PLUGIN) $(DESTDIR)$(MODULEDIR)/settings/$(SETTINGS)
	@# Only remove the config file if it is still our unmodified example.
	if [ -f $(DESTDIR)$(CONFDIR)/95-maildir-backup.conf ] && cmp -s $(CONF_EXAMPLE) $(DESTDIR)$(CONFDIR)/95-maildir-backup.conf; then \
		rm -f $(DESTDIR)$(CONFDIR)/95-maildir-backup.conf; fi

# The Debian package for the Dovecot DOVECOT_CONFIG names (debhelper; Dovecot 2.3 gives the
# Debian 12 package, 2.4 the Debian 13 one), into target/deb/.
deb:
	@test -n "$(RELEASE)" || { echo "no Dovecot headers for $(DOVECOT_CONFIG): install dovecot-dev"; exit 1; }
	mkdir -p target/deb
	debian/rules clean
	DOVECOT_CONFIG=$(DOVECOT_CONFIG) DEB_SUFFIX=$(DEB_SUFFIX) DEB_DESTDIR=$(CURDIR)/target/deb debian/rules binary

test:
	bash scripts/test.sh

clean:
	$(CARGO) clean
