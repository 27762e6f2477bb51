//! The request path as routing sees it: normalised once at the edge (RFC 3986 §6.2.2, plus
//! merged slashes), so that no spelling of a route's path can reach the app past the route's
//! authentication and rate limits, and the app receives the path that was routed on.

use std::borrow::Cow;

/// Why a path is refused with 400.
#[derive(Debug, PartialEq, Eq)]
pub enum BadPath {
    /// A control character, raw or percent-encoded (`%00`–`%1F`, `%7F`): no route or app
    /// needs one, and many treat `%00` as the end of the string.
    ControlCharacter,
    /// `%` not followed by two hex digits.
    BadPercentEncoding,
}

/// The normal form of `path`: percent-encoded unreserved characters decoded and the other
/// escapes in upper case (§6.2.2.1–2), dot segments removed (§6.2.2.3, `%2E` counts as `.`),
/// runs of `/` merged into one. `%2F` stays encoded: an encoded slash is data, not a
/// separator. A trailing slash is kept (routing ignores it, the app may not). Borrowed when
/// the path is already normal, as almost every path is.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, BadPath> {
    if is_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    if !decoded.starts_with('/') {
        // Asterisk-form (`OPTIONS *`): nothing to route on, nothing to resolve.
        return Ok(if decoded == path {
            Cow::Borrowed(path)
        } else {
            Cow::Owned(decoded)
        });
    }
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded[1..].split('/') {
        trailing_slash = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            name => segments.push(name),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for segment in &segments {
        normal.push('/');
        normal.push_str(segment);
    }
    if trailing_slash || segments.is_empty() {
        normal.push('/');
    }
    // Escapes already in normal form (`%20`) take this road and come out unchanged.
    if normal == path {
        return Ok(Cow::Borrowed(path));
    }
    Ok(Cow::Owned(normal))
}

/// True when `normalize` would return `path` unchanged: no escape, no control character, no
/// empty or dot segment.
fn is_normal(path: &str) -> bool {
    (path.starts_with('/') || path == "*")
        && !path.bytes().any(|b| b == b'%' || is_control(b))
        && !path.contains("//")
        && !path
            .split('/')
            .any(|segment| segment == "." || segment == "..")
}

/// Decodes `%XX` of unreserved characters; upper-cases the hex of the others.
fn decode_unreserved(path: &str) -> Result<String, BadPath> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if is_control(b) {
            return Err(BadPath::ControlCharacter);
        }
        if b != b'%' {
            // Copy the run up to the next escape whole, so multi-byte characters stay intact.
            let end = bytes[i..]
                .iter()
                .position(|&b| b == b'%' || is_control(b))
                .map_or(bytes.len(), |n| i + n);
            out.push_str(&path[i..end]);
            i = end;
            continue;
        }
        let (Some(high), Some(low)) = (
            bytes.get(i + 1).and_then(|&h| hex(h)),
            bytes.get(i + 2).and_then(|&l| hex(l)),
        ) else {
            return Err(BadPath::BadPercentEncoding);
        };
        let decoded = high << 4 | low;
        if is_control(decoded) {
            return Err(BadPath::ControlCharacter);
        }
        if is_unreserved(decoded) {
            out.push(char::from(decoded));
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(high)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(low)]));
        }
        i += 3;
    }
    Ok(out)
}

fn is_control(b: u8) -> bool {
    b < 0x20 || b == 0x7f
}

/// RFC 3986 §2.3: `ALPHA / DIGIT / "-" / "." / "_" / "~"`.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_forms() {
        let table = [
            // Already normal: borrowed, unchanged.
            ("/", "/"),
            ("/p/me", "/p/me"),
            ("/p/me/", "/p/me/"),
            ("/p/%C3%A9t%C3%A9", "/p/%C3%A9t%C3%A9"),
            ("/p/été", "/p/été"),
            // Repeated slashes merge.
            ("//p/me", "/p/me"),
            ("/p//me", "/p/me"),
            ("/p/me//", "/p/me/"),
            ("//", "/"),
            // Dot segments go (RFC 3986 §5.2.4), never above the root.
            ("/p/./me", "/p/me"),
            ("/p/x/../me", "/p/me"),
            ("/p/me/.", "/p/me/"),
            ("/p/me/..", "/p/"),
            ("/../../p/me", "/p/me"),
            ("/..", "/"),
            ("/p/.../me", "/p/.../me"),
            ("/p/..me", "/p/..me"),
            // Unreserved characters are decoded, so `%2e` is a dot.
            ("/p/%6De", "/p/me"),
            ("/p/%6d%65", "/p/me"),
            ("/p/x/%2e%2e/me", "/p/me"),
            ("/p/x/%2E%2E/me", "/p/me"),
            ("/p/%2e/me", "/p/me"),
            ("/%7Euser/%2D%5F", "/~user/-_"),
            // Reserved and other escapes stay encoded, in upper case: `%2F` is not a separator.
            ("/p/a%2fb", "/p/a%2Fb"),
            ("/p/a%2Fb/../c", "/p/c"),
            ("/p/..%2F..%2Fadmin", "/p/..%2F..%2Fadmin"),
            ("/p/%3f%23", "/p/%3F%23"),
            ("/p/%c3%a9", "/p/%C3%A9"),
            ("/p/%25", "/p/%25"),
            ("/p/%2525", "/p/%2525"),
            // Asterisk-form stays.
            ("*", "*"),
        ];
        for (raw, want) in table {
            let got = normalize(raw).unwrap_or_else(|e| panic!("{raw}: {e:?}"));
            assert_eq!(got, want, "{raw}");
            assert_eq!(matches!(got, Cow::Borrowed(_)), raw == want, "{raw}");
            assert_eq!(
                normalize(&got).unwrap(),
                got,
                "{raw}: normal form is stable"
            );
        }
    }

    #[test]
    fn refusals() {
        for (raw, want) in [
            ("/p/me%00", BadPath::ControlCharacter),
            ("/p/%00/../me", BadPath::ControlCharacter),
            ("/p/%0a", BadPath::ControlCharacter),
            ("/p/%0D%0A", BadPath::ControlCharacter),
            ("/p/%1f", BadPath::ControlCharacter),
            ("/p/%7F", BadPath::ControlCharacter),
            ("/p/\u{0}", BadPath::ControlCharacter),
            ("/p/a\tb", BadPath::ControlCharacter),
            ("/p/%", BadPath::BadPercentEncoding),
            ("/p/%4", BadPath::BadPercentEncoding),
            ("/p/%zz", BadPath::BadPercentEncoding),
            ("/p/%%41", BadPath::BadPercentEncoding),
        ] {
            assert_eq!(normalize(raw), Err(want), "{raw}");
        }
    }
}
