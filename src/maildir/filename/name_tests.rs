//! Message file names at the edges: odd info parts, sizes, unsafe names.

use super::*;

#[test]
fn unique_and_flags_split_at_the_first_colon() {
    let n = MessageName::parse("u.M1P1.h:2,S:x").unwrap();
    assert_eq!((n.unique(), n.flags()), ("u.M1P1.h", "S:x"));
    // Only version 2 info carries flags.
    assert_eq!(MessageName::parse("u:1,RS").unwrap().flags(), "");
    assert_eq!(MessageName::parse("u:2,").unwrap().flags(), "");
    assert_eq!(MessageName::parse("u:").unwrap().unique(), "u");
    assert_eq!(MessageName::parse("u:2,abcFRS").unwrap().flags(), "abcFRS");
}

#[test]
fn sizes_come_from_the_unique_part_only() {
    let size = |n: &str| MessageName::parse(n).unwrap().size();
    assert_eq!(size("u,W=10,S=20:2,S"), Some(20));
    assert_eq!(size("u,S=5,S=6"), Some(5));
    assert_eq!(size("u,S=:2,"), None);
    assert_eq!(size("u,S=-1"), None);
    assert_eq!(size("u,S=99999999999999999999999"), None);
    assert_eq!(size("u:2,S=5"), None, "after the colon it is flags, not a size");
    assert_eq!(size("S=5"), Some(5), "the first field counts too");
}

#[test]
fn dot_names_and_empty_names_are_not_messages() {
    for n in ["", ".", "..", ".dovecot-uidlist", ".temp.host.1.abc"] {
        assert!(MessageName::parse(n).is_none(), "{n:?}");
    }
}

#[test]
fn unsafe_names_are_refused() {
    let safe = |n: &str| MessageName::parse(n).unwrap().is_safe();
    assert!(safe("1700000000.M1P1.mail.example,S=1:2,S"));
    assert!(safe("unicodé.M1P1.h"));
    for bad in ["a\tb", "a\0b", "a\x7fb", "a\x1b[31mred", "a/b", "\u{85}next-line"] {
        assert!(!safe(bad), "{bad:?}");
    }
    assert!(safe(&"x".repeat(255)));
    assert!(!safe(&"x".repeat(256)), "longer than NAME_MAX");
}

#[test]
fn with_flags_round_trips() {
    for (u, f) in [("u.M1P1.h,S=3", "RS"), ("u", ""), ("u", "abz")] {
        let name = with_flags(u, f);
        let n = MessageName::parse(&name).unwrap();
        assert_eq!((n.unique(), n.flags()), (u, f));
    }
}

#[test]
fn subdirs() {
    assert_eq!(Subdir::ALL.map(|s| (s.index(), s.as_str(), s.to_string())), [(0, "cur", "cur".to_string()), (1, "new", "new".to_string())]);
    assert_eq!(serde_json::to_string(&Subdir::New).unwrap(), "\"new\"");
    assert_eq!(serde_json::from_str::<Subdir>("\"cur\"").unwrap(), Subdir::Cur);
    assert!(serde_json::from_str::<Subdir>("\"tmp\"").is_err());
}
