//! Percent-encoding of URL path segments and query values built from user input.
//!
//! Names are validated by the server, but the client must never build a broken URL from
//! whatever a user typed: everything outside RFC 3986's unreserved set is `%XX`-encoded.

/// Percent-encode `s` for use as one path segment (or query value): keeps `A-Z a-z 0-9 - . _ ~`.
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(hex_digit(b >> 4));
            out.push(hex_digit(b & 0x0f));
        }
    }
    out
}

/// Lowercase hex encoding of `bytes` (used for the hyperlocal socket host).
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(hex_digit(b >> 4).to_ascii_lowercase());
        out.push(hex_digit(b & 0x0f).to_ascii_lowercase());
    }
    out
}

fn hex_digit(n: u8) -> char {
    char::from(b"0123456789ABCDEF"[usize::from(n & 0x0f)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_unchanged() {
        assert_eq!(segment("web-0"), "web-0");
        assert_eq!(segment("a.b_c~D9"), "a.b_c~D9");
    }

    #[test]
    fn everything_else_is_escaped() {
        assert_eq!(segment("a/b"), "a%2Fb");
        assert_eq!(segment("a b?c#d"), "a%20b%3Fc%23d");
        assert_eq!(segment(".."), "..");
        assert_eq!(segment("%"), "%25");
        assert_eq!(segment("é"), "%C3%A9");
        assert_eq!(segment(""), "");
    }

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(hex(b"/x.sock"), "2f782e736f636b");
    }
}
