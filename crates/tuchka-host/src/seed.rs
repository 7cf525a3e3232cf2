//! NoCloud seed contents (pure): `meta-data` as YAML with every value double-quoted and
//! escaped, and `user-data` as given.

/// Quote `s` as a YAML double-quoted scalar: `\` and `"` are escaped, control characters become
/// `\n`, `\t`, … or `\xNN`/`\uNNNN`, everything else (including non-ASCII) is kept.
pub fn yaml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            '\u{85}' => out.push_str("\\N"),
            '\u{a0}' => out.push_str("\\_"),
            '\u{2028}' => out.push_str("\\L"),
            '\u{2029}' => out.push_str("\\P"),
            c if ('\u{80}'..'\u{a0}').contains(&c) || c == '\u{feff}' => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// NoCloud `meta-data`: `instance-id` (the VM id), `local-hostname` (the VM name) and, when keys
/// are given, `public-keys` as a YAML list.
pub fn render_meta_data(vm_id: &str, name: &str, ssh_keys: &[String]) -> String {
    let mut out = format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        yaml_quote(vm_id),
        yaml_quote(name)
    );
    if !ssh_keys.is_empty() {
        out.push_str("public-keys:\n");
        for key in ssh_keys {
            out.push_str("  - ");
            out.push_str(&yaml_quote(key.trim()));
            out.push('\n');
        }
    }
    out
}

/// NoCloud `user-data`: as given, or an empty `#cloud-config` document.
pub fn render_user_data(user_data: Option<&str>) -> String {
    user_data
        .map(str::to_string)
        .unwrap_or_else(|| "#cloud-config\n".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_and_escapes() {
        assert_eq!(yaml_quote("web-0"), "\"web-0\"");
        assert_eq!(yaml_quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(yaml_quote("x\ny\u{1}"), "\"x\\ny\\x01\"");
        assert_eq!(yaml_quote("#: -[]{}&*!|>'%@`"), "\"#: -[]{}&*!|>'%@`\"");
        assert_eq!(yaml_quote("ünï"), "\"ünï\"");
    }

    #[test]
    fn meta_data_without_and_with_keys() {
        assert_eq!(
            render_meta_data("iid-1", "web-0", &[]),
            "instance-id: \"iid-1\"\nlocal-hostname: \"web-0\"\n"
        );
        let keys = vec![
            "ssh-ed25519 AAAA user@h\n".to_string(),
            "ssh-rsa B \"q\"".to_string(),
        ];
        assert_eq!(
            render_meta_data("iid-1", "web-0", &keys),
            "instance-id: \"iid-1\"\nlocal-hostname: \"web-0\"\npublic-keys:\n  - \"ssh-ed25519 AAAA user@h\"\n  - \"ssh-rsa B \\\"q\\\"\"\n"
        );
    }

    #[test]
    fn user_data_default() {
        assert_eq!(render_user_data(None), "#cloud-config\n");
        assert_eq!(
            render_user_data(Some("#!/bin/sh\necho hi\n")),
            "#!/bin/sh\necho hi\n"
        );
    }
}
