//! Kubernetes' name and label syntax rules (apimachinery's `validation` package): each
//! function returns `Err(reason)` worded like the API server's messages.

const DNS1123_LABEL_MAX: usize = 63;
const DNS1123_SUBDOMAIN_MAX: usize = 253;

fn is_lower_alnum(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

fn label_shape_ok(s: &str, first: fn(u8) -> bool) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && first(b[0])
        && is_lower_alnum(b[b.len() - 1])
        && b.iter().all(|&c| is_lower_alnum(c) || c == b'-')
}

/// RFC 1123 label: namespace names, container names, port names of endpoint slices.
pub fn dns1123_label(s: &str) -> Result<(), String> {
    if s.len() > DNS1123_LABEL_MAX {
        return Err(format!(
            "must be no more than {DNS1123_LABEL_MAX} characters"
        ));
    }
    if !label_shape_ok(s, is_lower_alnum) {
        return Err("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name', or '123-abc')".into());
    }
    Ok(())
}

/// RFC 1123 subdomain: names of most objects (pods, deployments, config maps...).
pub fn dns1123_subdomain(s: &str) -> Result<(), String> {
    if s.len() > DNS1123_SUBDOMAIN_MAX {
        return Err(format!(
            "must be no more than {DNS1123_SUBDOMAIN_MAX} characters"
        ));
    }
    if s.is_empty() || !s.split('.').all(|l| label_shape_ok(l, is_lower_alnum)) {
        return Err("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com')".into());
    }
    Ok(())
}

/// RFC 1035 label: service names (they become DNS labels that must not start with a
/// digit).
pub fn dns1035_label(s: &str) -> Result<(), String> {
    if s.len() > DNS1123_LABEL_MAX {
        return Err(format!(
            "must be no more than {DNS1123_LABEL_MAX} characters"
        ));
    }
    if !label_shape_ok(s, |c| c.is_ascii_lowercase()) {
        return Err("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name', or 'abc-123')".into());
    }
    Ok(())
}

/// The name part of a qualified name / a label value: `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`.
fn qualified_name_part_ok(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// Label and annotation keys: `[prefix/]name`, prefix a DNS subdomain.
pub fn qualified_name(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, s),
    };
    if let Some(prefix) = prefix {
        dns1123_subdomain(prefix).map_err(|e| format!("prefix part {e}"))?;
    }
    if !qualified_name_part_ok(name) {
        return Err("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character, at most 63 characters (e.g. 'MyName', or 'my.name', or '123-abc'), with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')".into());
    }
    Ok(())
}

/// Label values: empty, or a qualified-name part.
pub fn label_value(s: &str) -> Result<(), String> {
    if s.is_empty() || qualified_name_part_ok(s) {
        Ok(())
    } else {
        Err("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character, at most 63 characters".into())
    }
}

/// IANA service names: named container ports and named target ports.
pub fn iana_svc_name(s: &str) -> Result<(), String> {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 15 {
        return Err("must be no more than 15 characters".into());
    }
    if !b.iter().all(|&c| is_lower_alnum(c) || c == b'-') {
        return Err(
            "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)".into(),
        );
    }
    if s.contains("--") {
        return Err("must not contain consecutive hyphens".into());
    }
    if !b.iter().any(u8::is_ascii_lowercase) {
        return Err("must contain at least one letter (a-z)".into());
    }
    if b[0] == b'-' || b[b.len() - 1] == b'-' {
        return Err("must not begin or end with a hyphen".into());
    }
    Ok(())
}

/// ConfigMap and Secret keys.
pub fn config_map_key(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > DNS1123_SUBDOMAIN_MAX {
        return Err(format!(
            "must be between 1 and {DNS1123_SUBDOMAIN_MAX} characters"
        ));
    }
    if !s
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return Err(
            "a valid config key must consist of alphanumeric characters, '-', '_' or '.'".into(),
        );
    }
    if s == "." || s == ".." || s.starts_with("..") {
        return Err("must not be '.' or '..' or start with '..'".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_rules_match_kubernetes() {
        assert!(dns1123_label("web-1").is_ok());
        assert!(dns1123_label("1web").is_ok());
        for bad in ["", "Web", "-web", "web-", "a.b", &"a".repeat(64)] {
            assert!(dns1123_label(bad).is_err(), "{bad}");
        }
        assert!(dns1123_subdomain("web.example.com").is_ok());
        assert!(dns1123_subdomain("web..com").is_err());
        assert!(dns1035_label("web").is_ok());
        assert!(dns1035_label("1web").is_err());
    }

    #[test]
    fn label_rules_match_kubernetes() {
        assert!(qualified_name("app").is_ok());
        assert!(qualified_name("app.kubernetes.io/name").is_ok());
        assert!(qualified_name("App_Name.x").is_ok());
        assert!(qualified_name("/x").is_err());
        assert!(qualified_name("Bad_Prefix/x").is_err());
        assert!(qualified_name("a/b/c").is_err());
        assert!(label_value("").is_ok());
        assert!(label_value("v1.2_3").is_ok());
        assert!(label_value("-x").is_err());
    }

    #[test]
    fn port_names_follow_iana() {
        assert!(iana_svc_name("http").is_ok());
        assert!(iana_svc_name("http-alt2").is_ok());
        for bad in ["", "8080", "a--b", "-a", "a-", "Http", "abcdefghijklmnop"] {
            assert!(iana_svc_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_keys() {
        assert!(config_map_key("app.properties").is_ok());
        assert!(config_map_key(".env").is_ok());
        assert!(config_map_key("..data").is_err());
        assert!(config_map_key("a/b").is_err());
    }
}
