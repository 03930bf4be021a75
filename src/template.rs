//! Destination templates with per-user variables, in both Dovecot spellings:
//! 2.3's `%u` `%n` `%d` and 2.4's `%{user}` `%{user | username}` `%{user | domain}`.

#[derive(Debug, thiserror::Error)]
#[error("destination template {template:?}: {what}")]
pub struct TemplateError {
    pub template: String,
    pub what: String,
}

/// Expands `template` for `user` (`local@domain`; domain empty if there is none).
pub fn expand(template: &str, user: &str) -> Result<String, TemplateError> {
    let (local, domain) = user.split_once('@').unwrap_or((user, ""));
    let err = |what: String| TemplateError { template: template.to_string(), what };
    let mut out = String::with_capacity(template.len() + user.len());
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('u') => out.push_str(user),
            Some('n') => out.push_str(local),
            Some('d') => out.push_str(domain),
            Some('%') => out.push('%'),
            Some('{') => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(ch) => name.push(ch),
                        None => return Err(err("unterminated %{".into())),
                    }
                }
                let key: String = name.split_whitespace().collect::<Vec<_>>().join(" ");
                out.push_str(match key.as_str() {
                    "user" => user,
                    "user | username" | "username" => local,
                    "user | domain" | "domain" => domain,
                    other => return Err(err(format!("unknown variable %{{{other}}}"))),
                });
            }
            Some(other) => return Err(err(format!("unknown variable %{other}"))),
            None => return Err(err("ends with a lone %".into())),
        }
    }
    if user.contains('/') || user == ".." || user == "." {
        return Err(err(format!("user name {user:?} cannot be used in a path")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::expand;

    #[test]
    fn expands_both_spellings() {
        assert_eq!(expand("/b/%d/%n/x", "al@ex.org").unwrap(), "/b/ex.org/al/x");
        assert_eq!(expand("/b/%u", "bob").unwrap(), "/b/bob");
        assert_eq!(expand("/b/%{user}/%{ user | domain }", "a@d").unwrap(), "/b/a@d/d");
        assert_eq!(expand("/b/%{user | username}", "a@d").unwrap(), "/b/a");
        assert!(expand("/b/%x", "a").is_err());
        assert!(expand("/b/%{nope}", "a").is_err());
        assert!(expand("/b/%u", "../x").is_err());
    }
}
