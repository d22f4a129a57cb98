//! Per-node values: what a role's user-data template is rendered from.
//!
//! Each role with a template names a *types file* (`value_types` in the
//! recipe) that declares every value the template takes and its type. A values
//! file, and a role's `test_values`, are checked against it before anything is
//! rendered: an unknown key, a missing one, or a value that is not of its type
//! is refused with the value's name and its file:line. The template then
//! writes every value through a quoting filter for its target format
//! (`yaml_str`, `conf_word`, `integer`; `url_host` brackets IPv6 addresses),
//! so a value can neither add YAML keys or haproxy/keepalived lines nor change
//! type (`on` stays a string).
//!
//! Types file syntax: `key = "TYPE"`, `key = "TYPE?"` (optional),
//! `key = "[TYPE]"` (a non-empty list), `key = [{ field = "TYPE", ... }]` (a
//! non-empty list of tables). TYPE is one of [`Scalar::NAMES`] or `int A..=B`.

use anyhow::{anyhow, Context, Result};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Serialize, Serializer};
use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};
use toml::Spanned;

// ---------------------------------------------------------------------------
// Values with their positions.

/// Where a value was written: its file, and line:column when known (TOML
/// files; JSON values files have no positions).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pos {
    pub file: PathBuf,
    pub line_col: Option<(usize, usize)>,
}

impl Pos {
    /// The position of byte `offset` of `text`, the contents of `file`.
    pub fn at(file: &Path, text: &str, offset: usize) -> Pos {
        Pos {
            file: file.to_path_buf(),
            line_col: Some(crate::util::diagnostics::line_col(text, offset)),
        }
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line_col {
            Some((l, c)) => write!(f, "{}:{l}:{c}", self.file.display()),
            None => write!(f, "{}", self.file.display()),
        }
    }
}

/// One value and where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Val,
    pub at: Pos,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    /// A string, integer, float, boolean or datetime.
    Scalar(toml::Value),
    List(Vec<Node>),
    Table(Vec<(String, Node)>),
}

impl Node {
    /// A value kiln supplies itself (an environment's facts), placed at `at`.
    pub(crate) fn from_toml(v: &toml::Value, at: &Pos) -> Node {
        let value = match v {
            toml::Value::Array(items) => {
                Val::List(items.iter().map(|i| Node::from_toml(i, at)).collect())
            }
            toml::Value::Table(t) => Val::Table(
                t.iter()
                    .map(|(k, v)| (k.clone(), Node::from_toml(v, at)))
                    .collect(),
            ),
            other => Val::Scalar(other.clone()),
        };
        Node {
            value,
            at: at.clone(),
        }
    }

    /// The plain TOML value (what templates see).
    pub fn to_toml(&self) -> toml::Value {
        match &self.value {
            Val::Scalar(v) => v.clone(),
            Val::List(items) => toml::Value::Array(items.iter().map(Node::to_toml).collect()),
            Val::Table(entries) => toml::Value::Table(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_toml()))
                    .collect(),
            ),
        }
    }

    fn kind(&self) -> &'static str {
        match &self.value {
            Val::Scalar(toml::Value::String(_)) => "a string",
            Val::Scalar(toml::Value::Integer(_)) => "an integer",
            Val::Scalar(toml::Value::Float(_)) => "a float",
            Val::Scalar(toml::Value::Boolean(_)) => "a boolean",
            Val::Scalar(toml::Value::Datetime(_)) => "a datetime",
            Val::Scalar(_) => "a value",
            Val::List(_) => "a list",
            Val::Table(_) => "a table",
        }
    }
}

/// Serialized as the plain value, exactly as a `toml::Value` would be (the
/// recipe digest covers `test_values`).
impl Serialize for Node {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.value {
            Val::Scalar(v) => v.serialize(s),
            Val::List(items) => s.collect_seq(items),
            Val::Table(entries) => s.collect_map(entries.iter().map(|(k, v)| (k, v))),
        }
    }
}

/// One node's values (a values file, or a role's `test_values`), in the order
/// they were written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Values {
    pub entries: Vec<(String, Node)>,
    /// Where the values as a whole come from: missing values are reported here.
    pub origin: Pos,
}

impl Serialize for Values {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.entries.iter().map(|(k, v)| (k, v)))
    }
}

impl Values {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Set `key`, keeping its place when it was already set.
    pub fn set(&mut self, key: &str, node: Node) {
        match self.entries.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = node,
            None => self.entries.push((key.to_string(), node)),
        }
    }

    /// The plain table templates are rendered from.
    pub fn to_table(&self) -> toml::Table {
        self.entries
            .iter()
            .map(|(k, v)| (k.clone(), v.to_toml()))
            .collect()
    }

    /// Parse a TOML values file, keeping each value's line.
    pub fn parse_toml(text: &str, file: &Path) -> Result<Values> {
        let raw: RawTable = toml::from_str(text).map_err(|e| {
            let (line, col) =
                crate::util::diagnostics::line_col(text, e.span().map_or(0, |s| s.start));
            anyhow!(
                "{}:{line}:{col}: {}",
                file.display(),
                e.message().trim().replace('\n', " ")
            )
        })?;
        Ok(Values {
            entries: raw.locate(file, text),
            origin: Pos {
                file: file.to_path_buf(),
                line_col: None,
            },
        })
    }

    /// Parse a JSON values file (an object; positions are not known).
    pub fn parse_json(text: &str, file: &Path) -> Result<Values> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| anyhow!("{}:{}:{}: {e}", file.display(), e.line(), e.column()))?;
        let at = Pos {
            file: file.to_path_buf(),
            line_col: None,
        };
        let serde_json::Value::Object(map) = v else {
            anyhow::bail!("{}: values must be a JSON object", file.display());
        };
        let mut entries = Vec::new();
        for (k, v) in map {
            let node = json_node(&v, &at).with_context(|| format!("{at}: value `{k}`"))?;
            entries.push((k, node));
        }
        Ok(Values {
            entries,
            origin: at,
        })
    }
}

fn json_node(v: &serde_json::Value, at: &Pos) -> Result<Node> {
    use serde_json::Value as J;
    let value = match v {
        J::Null => anyhow::bail!("null is not a value (leave the key out)"),
        J::Bool(b) => Val::Scalar(toml::Value::Boolean(*b)),
        J::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Val::Scalar(toml::Value::Integer(i)),
            (None, Some(f)) => Val::Scalar(toml::Value::Float(f)),
            _ => anyhow::bail!("{n} is out of range"),
        },
        J::String(s) => Val::Scalar(toml::Value::String(s.clone())),
        J::Array(items) => Val::List(
            items
                .iter()
                .map(|i| json_node(i, at))
                .collect::<Result<_>>()?,
        ),
        J::Object(map) => Val::Table(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), json_node(v, at)?)))
                .collect::<Result<_>>()?,
        ),
    };
    Ok(Node {
        value,
        at: at.clone(),
    })
}

// ---------------------------------------------------------------------------
// Parsing TOML with spans: a table whose every value keeps its byte range.

/// A TOML table as parsed, each value with its span (deserialize through
/// `toml`, which fills in [`Spanned`]).
#[derive(Debug, Default)]
pub struct RawTable(Vec<(String, Spanned<Raw>)>);

#[derive(Debug)]
pub enum Raw {
    Scalar(toml::Value),
    Array(Vec<Spanned<Raw>>),
    Table(RawTable),
}

impl RawTable {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The values with their positions in `file`, whose text is `text`.
    pub fn locate(&self, file: &Path, text: &str) -> Vec<(String, Node)> {
        self.0
            .iter()
            .map(|(k, v)| (k.clone(), locate(v, file, text)))
            .collect()
    }
}

fn locate(raw: &Spanned<Raw>, file: &Path, text: &str) -> Node {
    let at = Pos::at(file, text, raw.span().start);
    let value = match raw.get_ref() {
        Raw::Scalar(v) => Val::Scalar(v.clone()),
        Raw::Array(items) => Val::List(items.iter().map(|i| locate(i, file, text)).collect()),
        Raw::Table(t) => Val::Table(t.locate(file, text)),
    };
    Node { value, at }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RawVisitor)
    }
}

impl<'de> Deserialize<'de> for RawTable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match d.deserialize_map(RawVisitor)? {
            Raw::Table(t) => Ok(t),
            _ => Err(de::Error::custom("expected a table")),
        }
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a TOML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Raw, E> {
        Ok(Raw::Scalar(toml::Value::Boolean(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Raw, E> {
        Ok(Raw::Scalar(toml::Value::Integer(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Raw, E> {
        i64::try_from(v)
            .map(|v| Raw::Scalar(toml::Value::Integer(v)))
            .map_err(|_| E::custom(format!("{v} is out of range")))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Raw, E> {
        Ok(Raw::Scalar(toml::Value::Float(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw::Scalar(toml::Value::String(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<Raw, E> {
        Ok(Raw::Scalar(toml::Value::String(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Raw>>()? {
            items.push(item);
        }
        Ok(Raw::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            // toml hands a datetime to visitors as a one-key map
            // (toml_datetime's `__unstable::FIELD`).
            if key == "$__toml_private_datetime" {
                let s: String = map.next_value()?;
                let dt = s
                    .parse::<toml::value::Datetime>()
                    .map_err(de::Error::custom)?;
                return Ok(Raw::Scalar(toml::Value::Datetime(dt)));
            }
            entries.push((key, map.next_value::<Spanned<Raw>>()?));
        }
        Ok(Raw::Table(RawTable(entries)))
    }
}

// ---------------------------------------------------------------------------
// Types.

/// The declared values of a role's template (its `value_types` file).
#[derive(Debug, Clone, PartialEq)]
pub struct ValueTypes {
    pub file: PathBuf,
    pub decls: Vec<(String, Decl)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decl {
    pub ty: Ty,
    pub optional: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Ty {
    Scalar(Scalar),
    /// A non-empty list.
    List(Box<Ty>),
    Record(Vec<(String, Decl)>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scalar {
    Ip,
    Ipv4,
    Ipv6,
    Cidr,
    Hostname,
    /// An IP address or a host name (an NTP server, an S3 endpoint).
    Host,
    San,
    Port,
    Int(i64, i64),
    Pem,
    SshPublicKey,
    Token,
    HttpsUrl,
    IfName,
    Bool,
}

/// A problem with a value (or a types file), located.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueError {
    pub at: Pos,
    pub message: String,
}

impl fmt::Display for ValueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

impl std::error::Error for ValueError {}

fn fail<T>(at: &Pos, message: impl Into<String>) -> Result<T, ValueError> {
    Err(ValueError {
        at: at.clone(),
        message: message.into(),
    })
}

impl Scalar {
    /// The type names a types file may use (and `int A..=B`).
    pub const NAMES: &'static [&'static str] = &[
        "ip",
        "ipv4",
        "ipv6",
        "cidr",
        "hostname",
        "host",
        "san",
        "port",
        "pem",
        "ssh-public-key",
        "token",
        "https-url",
        "ifname",
        "bool",
    ];

    fn parse(s: &str) -> Option<Scalar> {
        Some(match s {
            "ip" => Scalar::Ip,
            "ipv4" => Scalar::Ipv4,
            "ipv6" => Scalar::Ipv6,
            "cidr" => Scalar::Cidr,
            "hostname" => Scalar::Hostname,
            "host" => Scalar::Host,
            "san" => Scalar::San,
            "port" => Scalar::Port,
            "pem" => Scalar::Pem,
            "ssh-public-key" => Scalar::SshPublicKey,
            "token" => Scalar::Token,
            "https-url" => Scalar::HttpsUrl,
            "ifname" => Scalar::IfName,
            "bool" => Scalar::Bool,
            _ => {
                let range = s.strip_prefix("int ")?;
                let (lo, hi) = range.trim().split_once("..=")?;
                let (lo, hi) = (lo.trim().parse().ok()?, hi.trim().parse().ok()?);
                if lo > hi {
                    return None;
                }
                Scalar::Int(lo, hi)
            }
        })
    }

    /// What a value of this type is, for messages.
    pub fn describe(&self) -> String {
        match self {
            Scalar::Ip => "an IPv4 or IPv6 address".into(),
            Scalar::Ipv4 => "an IPv4 address".into(),
            Scalar::Ipv6 => "an IPv6 address".into(),
            Scalar::Cidr => "a CIDR network such as 10.42.0.0/16".into(),
            Scalar::Hostname => "a lowercase RFC 1123 host name".into(),
            Scalar::Host => "an IP address or a lowercase RFC 1123 host name".into(),
            Scalar::San => "an IP address or host name (`*.` allowed in front)".into(),
            Scalar::Port => "a port 1..=65535".into(),
            Scalar::Int(lo, hi) => format!("an integer {lo}..={hi}"),
            Scalar::Pem => "PEM (-----BEGIN ...----- base64 -----END ...-----)".into(),
            Scalar::SshPublicKey => "an SSH public key (`TYPE BASE64 [comment]`)".into(),
            Scalar::Token => "a token of printable ASCII without spaces".into(),
            Scalar::HttpsUrl => "an https:// URL without query or fragment".into(),
            Scalar::IfName => "a network interface name".into(),
            Scalar::Bool => "true or false".into(),
        }
    }

    /// Check one value: Ok, or why it is not of this type.
    fn check(&self, v: &toml::Value) -> Result<(), String> {
        let not = || format!("is not {}", self.describe());
        match (self, v) {
            (Scalar::Int(lo, hi), toml::Value::Integer(i)) => {
                (lo..=hi).contains(&i).then_some(()).ok_or_else(not)
            }
            (Scalar::Port, toml::Value::Integer(i)) => {
                (1..=65535).contains(i).then_some(()).ok_or_else(not)
            }
            (Scalar::Bool, toml::Value::Boolean(_)) => Ok(()),
            (Scalar::Int(..) | Scalar::Port | Scalar::Bool, _) => Err(not()),
            (_, toml::Value::String(s)) => {
                let ok = match self {
                    Scalar::Ip => s.parse::<IpAddr>().is_ok(),
                    Scalar::Ipv4 => s.parse::<std::net::Ipv4Addr>().is_ok(),
                    Scalar::Ipv6 => s.parse::<Ipv6Addr>().is_ok(),
                    Scalar::Cidr => return check_cidr(s),
                    Scalar::Hostname => is_hostname(s),
                    Scalar::Host => s.parse::<IpAddr>().is_ok() || is_hostname(s),
                    Scalar::San => {
                        s.parse::<IpAddr>().is_ok()
                            || is_hostname(s.strip_prefix("*.").unwrap_or(s))
                    }
                    Scalar::Pem => return check_pem(s),
                    Scalar::SshPublicKey => return check_ssh_public_key(s),
                    Scalar::Token => {
                        !s.is_empty() && s.len() <= 4096 && s.bytes().all(|b| b.is_ascii_graphic())
                    }
                    Scalar::HttpsUrl => is_https_url(s),
                    Scalar::IfName => {
                        // Linux's dev_valid_name (net/core/dev.c): at most
                        // IFNAMSIZ-1 = 15 bytes, not `.`/`..`, no `/`, `:` or
                        // space; kiln also keeps to characters that are plain
                        // words in keepalived.conf.
                        (1..=15).contains(&s.len())
                            && s != "."
                            && s != ".."
                            && s.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
                    }
                    Scalar::Int(..) | Scalar::Port | Scalar::Bool => unreachable!(),
                };
                ok.then_some(()).ok_or_else(not)
            }
            _ => Err(not()),
        }
    }
}

/// A lowercase RFC 1123 host name (section 2.1): dot-separated labels of
/// 1..=63 letters, digits and `-`, not starting or ending with `-`, at most
/// 253 characters, the last label not all digits (so no IPv4 address passes).
/// Lowercase only: Kubernetes node names must be (RFC 1123 subdomains).
pub fn is_hostname(s: &str) -> bool {
    let labels: Vec<&str> = s.split('.').collect();
    !s.is_empty()
        && s.len() <= 253
        && labels.iter().all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
        && !labels
            .last()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

fn check_cidr(s: &str) -> Result<(), String> {
    let bad = || format!("is not {}", Scalar::Cidr.describe());
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let len: u32 = len.parse().map_err(|_| bad())?;
    let (bits, max) = match addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)) << 96, 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    };
    if len > max {
        return Err(bad());
    }
    let host_mask = if len == 0 {
        u128::MAX
    } else {
        u128::MAX >> len
    };
    if bits & host_mask != 0 {
        return Err("has host bits set (write the network address)".into());
    }
    Ok(())
}

/// One or more PEM blocks (RFC 7468 strict form): `-----BEGIN LABEL-----`,
/// base64 lines, `-----END LABEL-----`, nothing else.
fn check_pem(s: &str) -> Result<(), String> {
    use base64::Engine as _;
    let bad = |why: &str| format!("is not PEM: {why}");
    let mut lines = s.trim().split('\n').peekable();
    let mut blocks = 0;
    while let Some(begin) = lines.next() {
        let label = begin
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
            .filter(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b' ')
            })
            .ok_or_else(|| bad("expected a -----BEGIN LABEL----- line"))?;
        let end = format!("-----END {label}-----");
        let mut body = String::new();
        loop {
            match lines.next() {
                Some(l) if l == end => break,
                Some(l)
                    if !l.is_empty()
                        && l.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)) =>
                {
                    body.push_str(l)
                }
                _ => return Err(bad(&format!("expected base64 lines, then `{end}`"))),
            }
        }
        if body.is_empty()
            || base64::engine::general_purpose::STANDARD
                .decode(&body)
                .is_err()
        {
            return Err(bad(&format!("the {label} body is not base64")));
        }
        blocks += 1;
    }
    if blocks == 0 {
        return Err(bad("empty"));
    }
    Ok(())
}

/// An OpenSSH public key line without options (sshd(8), AUTHORIZED_KEYS FILE
/// FORMAT): `TYPE BASE64 [comment]`, TYPE one sshd accepts by default, the
/// base64 blob in SSH wire format starting with TYPE (RFC 4253 section 6.6).
fn check_ssh_public_key(s: &str) -> Result<(), String> {
    use base64::Engine as _;
    const TYPES: &[&str] = &[
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ];
    let bad = |why: &str| format!("is not an SSH public key: {why}");
    if s.chars().any(char::is_control) {
        return Err(bad("it holds control characters"));
    }
    let mut parts = s.splitn(3, ' ');
    let (ty, b64) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !TYPES.contains(&ty) {
        return Err(bad(&format!(
            "type `{ty}` is not one of {}",
            TYPES.join(", ")
        )));
    }
    let blob = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| bad("the key is not base64"))?;
    let named = blob
        .get(..4)
        .map(|n| u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize)
        .and_then(|n| blob.get(4..4 + n))
        .filter(|name| *name == ty.as_bytes() && blob.len() > 4 + ty.len());
    if named.is_none() {
        return Err(bad(&format!("the key data is not a {ty} key")));
    }
    Ok(())
}

fn is_https_url(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("https://") else {
        return false;
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host_ok = if let Some(v6) = authority.strip_prefix('[') {
        match v6.split_once(']') {
            Some((a, port)) => a.parse::<Ipv6Addr>().is_ok() && is_opt_port(port),
            None => false,
        }
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        (host.parse::<std::net::Ipv4Addr>().is_ok() || is_hostname(host))
            && port.is_none_or(|p| is_opt_port(&format!(":{p}")))
    };
    // RFC 3986 path characters (unreserved, sub-delims but `'`, `:`, `@`,
    // pct-encoded); no query or fragment: an OIDC issuer has none.
    host_ok
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~/%!$&()*+,;=:@".contains(&b))
}

fn is_opt_port(s: &str) -> bool {
    s.is_empty()
        || s.strip_prefix(':').is_some_and(|p| {
            !p.is_empty()
                && p.len() <= 5
                && p.bytes().all(|b| b.is_ascii_digit())
                && (1..=65535).contains(&p.parse::<u32>().unwrap_or(0))
        })
}

impl ValueTypes {
    /// Load a types file.
    pub fn load(path: &Path) -> Result<ValueTypes, ValueError> {
        let whole = Pos {
            file: path.to_path_buf(),
            line_col: None,
        };
        let text = std::fs::read_to_string(path)
            .or_else(|e| fail(&whole, format!("cannot read value types: {e}")))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<ValueTypes, ValueError> {
        let raw: RawTable = toml::from_str(text).map_err(|e| ValueError {
            at: Pos::at(path, text, e.span().map_or(0, |s| s.start)),
            message: e.message().trim().replace('\n', " "),
        })?;
        let decls = parse_decls(&raw.locate(path, text))?;
        Ok(ValueTypes {
            file: path.to_path_buf(),
            decls,
        })
    }

    /// Check one node's values: every key declared, every declared value
    /// present unless optional, every value of its type.
    pub fn check(&self, values: &Values) -> Result<(), ValueError> {
        check_fields(&self.decls, &values.entries, "", &values.origin)
    }
}

fn parse_decls(entries: &[(String, Node)]) -> Result<Vec<(String, Decl)>, ValueError> {
    entries
        .iter()
        .map(|(k, n)| Ok((k.clone(), parse_decl(n)?)))
        .collect()
}

fn parse_decl(n: &Node) -> Result<Decl, ValueError> {
    match &n.value {
        Val::Scalar(toml::Value::String(s)) => {
            let (s, optional) = match s.strip_suffix('?') {
                Some(s) => (s, true),
                None => (s.as_str(), false),
            };
            let (name, list) = match s.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
                Some(inner) => (inner, true),
                None => (s, false),
            };
            let Some(scalar) = Scalar::parse(name) else {
                let hint = crate::util::diagnostics::did_you_mean(name, Scalar::NAMES)
                    .map(|s| format!("did you mean `{s}`?"))
                    .unwrap_or_else(|| format!("types: {}, int A..=B", Scalar::NAMES.join(", ")));
                return fail(&n.at, format!("unknown value type `{name}` ({hint})"));
            };
            let ty = Ty::Scalar(scalar);
            Ok(Decl {
                ty: if list { Ty::List(Box::new(ty)) } else { ty },
                optional,
            })
        }
        Val::List(items) => match items.as_slice() {
            [Node {
                value: Val::Table(fields),
                ..
            }] => Ok(Decl {
                ty: Ty::List(Box::new(Ty::Record(parse_decls(fields)?))),
                optional: false,
            }),
            _ => fail(
                &n.at,
                "a list type is \"[TYPE]\" or [{ field = \"TYPE\", ... }] (one table)",
            ),
        },
        Val::Table(fields) => Ok(Decl {
            ty: Ty::Record(parse_decls(fields)?),
            optional: false,
        }),
        _ => fail(
            &n.at,
            "a value type is a string such as \"ip\" or \"port?\"",
        ),
    }
}

/// A value shown in a message: quoted and escaped on one line, shortened.
fn shown(n: &Node) -> String {
    let full = match &n.value {
        Val::Scalar(toml::Value::String(s)) => format!("{s:?}"),
        Val::Scalar(v) => v.to_string(),
        _ => return String::new(),
    };
    let short: String = full.chars().take(60).collect();
    if short.len() < full.len() {
        format!(" {short}…")
    } else {
        format!(" {short}")
    }
}

fn check_fields(
    decls: &[(String, Decl)],
    entries: &[(String, Node)],
    prefix: &str,
    whole: &Pos,
) -> Result<(), ValueError> {
    let names: Vec<&str> = decls.iter().map(|(k, _)| k.as_str()).collect();
    for (key, node) in entries {
        let path = format!("{prefix}{key}");
        let Some((_, decl)) = decls.iter().find(|(k, _)| k == key) else {
            let hint = crate::util::diagnostics::did_you_mean(key, &names)
                .map(|s| format!("did you mean `{prefix}{s}`?"))
                .unwrap_or_else(|| format!("values: {}", names.join(", ")));
            return fail(&node.at, format!("unknown value `{path}` ({hint})"));
        };
        check_ty(&decl.ty, node, &path)?;
    }
    let missing: Vec<String> = decls
        .iter()
        .filter(|(k, d)| !d.optional && !entries.iter().any(|(e, _)| e == k))
        .map(|(k, d)| format!("`{prefix}{k}` ({})", describe_ty(&d.ty)))
        .collect();
    if !missing.is_empty() {
        return fail(whole, format!("missing value {}", missing.join(", ")));
    }
    Ok(())
}

fn describe_ty(ty: &Ty) -> String {
    match ty {
        Ty::Scalar(s) => s.describe(),
        Ty::List(inner) => format!("a list, each {}", describe_ty(inner)),
        Ty::Record(fields) => format!(
            "{{ {} }}",
            fields
                .iter()
                .map(|(k, d)| format!("{k}{}", if d.optional { "?" } else { "" }))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn check_ty(ty: &Ty, node: &Node, path: &str) -> Result<(), ValueError> {
    match (ty, &node.value) {
        (Ty::Scalar(s), Val::Scalar(v)) => s.check(v).or_else(|why| {
            // Secrets are named, never shown.
            let shown = match s {
                Scalar::Token | Scalar::Pem => String::new(),
                _ => shown(node),
            };
            fail(&node.at, format!("value `{path}`{shown} {why}"))
        }),
        (Ty::List(_), Val::List(items)) if items.is_empty() => fail(
            &node.at,
            format!("value `{path}` is an empty list (leave it out, or list at least one)"),
        ),
        (Ty::List(inner), Val::List(items)) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, item)| check_ty(inner, item, &format!("{path}[{i}]"))),
        (Ty::Record(fields), Val::Table(entries)) => {
            check_fields(fields, entries, &format!("{path}."), &node.at)
        }
        _ => fail(
            &node.at,
            format!(
                "value `{path}` must be {}, not {}",
                describe_ty(ty),
                node.kind()
            ),
        ),
    }
}

// ---------------------------------------------------------------------------
// Quoting filters for role templates.

/// The filters whose output is safe to place in a template's text: every
/// `{{ ... }}` of a role template ends with one of them.
pub const QUOTING_FILTERS: &[&str] = &["yaml_str", "conf_word", "integer"];

/// Register the quoting filters (and `url_host`, `eol`) on `tera`.
pub fn register_filters(tera: &mut tera::Tera) {
    tera.register_filter("yaml_str", yaml_str_filter);
    tera.register_filter("conf_word", conf_word_filter);
    tera.register_filter("integer", integer_filter);
    tera.register_filter("url_host", url_host_filter);
    tera.register_filter("eol", eol_filter);
}

/// The text with a newline added: a file's content as one line (Tera string
/// literals have no escapes, so `~ "\n"` cannot be written).
fn eol_filter(v: &tera::Value, _: &Args) -> tera::Result<tera::Value> {
    Ok(tera::Value::String(scalar_text("eol", v)? + "\n"))
}

type Args = std::collections::HashMap<String, tera::Value>;

fn scalar_text(name: &str, v: &tera::Value) -> tera::Result<String> {
    match v {
        tera::Value::String(s) => Ok(s.clone()),
        tera::Value::Number(n) => Ok(n.to_string()),
        tera::Value::Bool(b) => Ok(b.to_string()),
        other => Err(tera::Error::msg(format!(
            "{name} takes a string or number, not {other}"
        ))),
    }
}

/// A YAML double-quoted scalar holding exactly `s`, in printable ASCII on one
/// line (YAML 1.2 section 5.7 escapes, which PyYAML, cloud-init's parser,
/// reads too: `\"`, `\\`, `\n`, `\t`, `\uXXXX`, `\UXXXXXXXX`). Raw non-ASCII
/// is escaped as well: YAML 1.1 treats U+0085, U+2028 and U+2029 as line
/// breaks, which inside a block scalar would end the line.
pub fn yaml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            c if (c as u32) <= 0xFFFF => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08X}", c as u32);
            }
        }
    }
    out.push('"');
    out
}

fn yaml_str_filter(v: &tera::Value, _: &Args) -> tera::Result<tera::Value> {
    Ok(tera::Value::String(yaml_quote(&scalar_text(
        "yaml_str", v,
    )?)))
}

/// One word of haproxy.cfg or keepalived.conf, unquoted: letters, digits and
/// `. _ : / [ ] -` only. Both split words on white space; haproxy also
/// treats `#`, quotes, `\` and `$` specially (src/cfgparse.c, parse_line with
/// PARSE_OPT_SHARP|DQUOTE|SQUOTE|BKSLASH|ENV), keepalived `!`, `#`, quotes,
/// `$`, `{` and `}` (doc/man/man5/keepalived.conf.5.in, "Quoted strings" and
/// "Parameter substitution"). A value needing anything else is refused.
pub fn conf_word(s: &str) -> Option<&str> {
    (!s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/[]-".contains(&b)))
    .then_some(s)
}

fn conf_word_filter(v: &tera::Value, _: &Args) -> tera::Result<tera::Value> {
    let s = scalar_text("conf_word", v)?;
    match conf_word(&s) {
        Some(w) => Ok(tera::Value::String(w.to_string())),
        None => Err(tera::Error::msg(format!(
            "{s:?} is not a plain word for haproxy/keepalived (letters, digits, . _ : / [ ] - only)"
        ))),
    }
}

fn integer_filter(v: &tera::Value, _: &Args) -> tera::Result<tera::Value> {
    match v {
        tera::Value::Number(n) if n.is_i64() || n.is_u64() => Ok(v.clone()),
        other => Err(tera::Error::msg(format!(
            "integer takes an integer, not {other}"
        ))),
    }
}

/// The host part of a URL or `host:port`: an IPv6 address in brackets
/// (RFC 3986 section 3.2.2; haproxy's server address accepts `[addr]:port`
/// too, src/tools.c str2sa_range), anything else as it is.
pub fn url_host(s: &str) -> String {
    match s.parse::<Ipv6Addr>() {
        Ok(_) => format!("[{s}]"),
        Err(_) => s.to_string(),
    }
}

fn url_host_filter(v: &tera::Value, _: &Args) -> tera::Result<tera::Value> {
    Ok(tera::Value::String(url_host(&scalar_text("url_host", v)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types(text: &str) -> ValueTypes {
        ValueTypes::parse(text, Path::new("t.types.toml")).unwrap()
    }

    fn values(text: &str) -> Values {
        Values::parse_toml(text, Path::new("node.toml")).unwrap()
    }

    fn check_err(types_text: &str, values_text: &str) -> String {
        types(types_text)
            .check(&values(values_text))
            .unwrap_err()
            .to_string()
    }

    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
    const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDgNh64n7C4g45oMON+3I37ks7tDpurSh7yTRS1TKMYX5Ebt/7+KiatbIyhFzNB00QU40ZEWxHaejVtPh5dF3rQcMLpS2BkqCUQ5zn7AKxXZR38n3AviOOiu7Sm4kxoq3r2yUejVSqNMEWS/aHcoUndlHqpkeF2gbEe2YwelkTCzPNvkly8S9LAdM9lQDMsaXfAG3/sWr7YUw27WvYf/tLKJej3lSUPAN0Han03WQobsHswgKvsl8ZsfuaURO4bBH4Cj6RDg0n7s+M7ExKzgzH4YkGV0WTbIT5F0eEErHqn5obkH4VGoqlBe02zMz0F/J7D5y/7zfJvG1D0nqatiZtj ops@x";
    const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBP8OOM+Bmof76KLwkTTjNd3Zllu9x2rbfXjuU4fp737Pj+Id08LlTR38ZOISeEfpODxMPxNbb9AEM9VSgtj1nig=";

    #[test]
    fn each_scalar_type_accepts_its_values_and_refuses_others() {
        use toml::Value::{Boolean as B, Integer as I, String as S};
        let s = |x: &str| S(x.to_string());
        let pem = "-----BEGIN PUBLIC KEY-----\nTUlJQmtpbG4=\n-----END PUBLIC KEY-----\n";
        let two_pems = format!("{pem}{}", pem.replace("PUBLIC", "PRIVATE"));
        let table: Vec<(&str, Vec<toml::Value>, Vec<toml::Value>)> = vec![
            (
                "ip",
                vec![s("10.0.2.15"), s("fd00::10"), s("::1")],
                vec![
                    s("10.0.2.15\n  - path: /etc/x"),
                    s("10.0.2.15 "),
                    s("10.0.2.256"),
                    s("[fd00::10]"),
                    s("fd00::10%eth0"),
                    s("10.0.2.0/24"),
                    s("lb-1"),
                    s(""),
                    I(1),
                ],
            ),
            (
                "ipv4",
                vec![s("192.0.2.1")],
                vec![s("fd00::1"), s("010.0.0.1")],
            ),
            ("ipv6", vec![s("fd00::1")], vec![s("192.0.2.1")]),
            (
                "cidr",
                vec![s("10.42.0.0/16"), s("fd00:42::/56"), s("0.0.0.0/0")],
                vec![
                    s("10.42.0.1/16"),
                    s("10.42.0.0/33"),
                    s("10.42.0.0"),
                    s("10.42.0.0/+8"),
                ],
            ),
            (
                "hostname",
                vec![
                    s("lb-1"),
                    s("on"),
                    s("k3s.example.com"),
                    s("0x1f"),
                    s(&"a".repeat(63)),
                ],
                vec![
                    s("lb 1"),
                    s("lb-1\nruncmd: [reboot]"),
                    s("-lb"),
                    s("lb-"),
                    s("LB-1"),
                    s("lb_1"),
                    s("a..b"),
                    s("10.0.0.1"),
                    s(&"a".repeat(64)),
                    s(""),
                    s("*.example.com"),
                ],
            ),
            (
                "host",
                vec![s("0.debian.pool.ntp.org"), s("192.0.2.1"), s("fd00::123")],
                vec![
                    s("*.pool.ntp.org"),
                    s("ntp 1"),
                    s("ntp.example.com\nNTP=evil"),
                    s("[fd00::123]"),
                    s(""),
                ],
            ),
            (
                "san",
                vec![s("*.k8s.example.com"), s("k8s.example.com"), s("fd00::10")],
                vec![s("*.*.example.com"), s("a b"), s("x\n- y"), s("*")],
            ),
            (
                "port",
                vec![I(1), I(6443), I(65535)],
                vec![I(0), I(65536), s("6443")],
            ),
            (
                "int 1..=254",
                vec![I(1), I(254)],
                vec![I(0), I(255), s("100"), B(true)],
            ),
            (
                "pem",
                vec![s(pem), s(&two_pems)],
                vec![
                    s("not pem"),
                    s("-----BEGIN PUBLIC KEY-----\nTUlJQmtpbG4=\n-----END PRIVATE KEY-----"),
                    s("-----BEGIN PUBLIC KEY-----\nnot base64!\n-----END PUBLIC KEY-----"),
                    s("-----BEGIN PUBLIC KEY-----\nTUlJQmtpbG4\n-----END PUBLIC KEY-----"),
                    s(&format!("{pem}\n  - path: /etc/evil")),
                ],
            ),
            (
                "ssh-public-key",
                vec![
                    s(ED25519),
                    s(&format!("{ED25519} admin@host: #1")),
                    s(RSA),
                    s(ECDSA),
                ],
                vec![
                    s("not a key"),
                    s(&format!("{ED25519}\n  - evil")),
                    s("ssh-ed25519 AAAA"),
                    s(&format!("ssh-rsa {}", &ED25519[12..])),
                ],
            ),
            (
                "token",
                vec![s("K10abc::server:p@ss#w\"rd'\\")],
                vec![s(""), s("a b"), s("a\nb"), s("tök")],
            ),
            (
                "https-url",
                vec![
                    s("https://kubernetes.default.svc.cluster.local"),
                    s("https://oidc.example.com:8443/issuer"),
                    s("https://[fd00::1]:6443"),
                ],
                vec![
                    s("http://oidc.example.com"),
                    s("https://oidc.example.com/?x=1"),
                    s("https://oidc.example.com/a b"),
                    s("https://oidc.example.com\n- x"),
                    s("https://user@oidc.example.com"),
                    s("https://"),
                ],
            ),
            (
                "ifname",
                vec![s("eth0"), s("ens18"), s("vlan.100")],
                vec![
                    s("eth0 dev lo"),
                    s("averyveryverylongname"),
                    s("a/b"),
                    s(".."),
                    s("}"),
                ],
            ),
            ("bool", vec![B(true), B(false)], vec![s("true"), I(1)]),
        ];
        for (ty, good, bad) in table {
            let scalar = Scalar::parse(ty).unwrap_or_else(|| panic!("{ty}"));
            for v in good {
                assert_eq!(scalar.check(&v), Ok(()), "{ty} should accept {v}");
            }
            for v in bad {
                assert!(scalar.check(&v).is_err(), "{ty} should refuse {v}");
            }
        }
    }

    #[test]
    fn type_errors_name_the_value_and_its_line() {
        let t = "node_ip = \"ip\"\nbackends = [{ name = \"hostname\", address = \"ip\", port = \"port?\" }]\n";
        let v = "node_ip = \"10.0.2.15\"\nbackends = [\n  { name = \"s1\", address = \"10.0.2.21\" },\n  { name = \"s2\", address = \"10.0.2.22\\n    server evil 203.0.113.66:6443\" },\n]\n";
        let err = check_err(t, v);
        assert!(err.starts_with("node.toml:4:"), "{err}");
        assert!(
            err.contains("value `backends[1].address`") && err.contains("is not an IPv4 or IPv6"),
            "{err}"
        );
        assert!(!err.contains('\n'), "one line: {err}");
    }

    #[test]
    fn unknown_value_is_refused_with_a_suggestion() {
        let err = check_err(
            "priority = \"int 1..=254\"\n",
            "priority = 1\nprority = 2\n",
        );
        assert!(err.starts_with("node.toml:2:"), "{err}");
        assert!(
            err.contains("unknown value `prority` (did you mean `priority`?)"),
            "{err}"
        );
    }

    #[test]
    fn missing_values_are_all_named_but_optional_ones_may_be_left_out() {
        let t = "hostname = \"hostname\"\nvip = \"ip\"\napi_port = \"port?\"\n";
        let err = check_err(t, "");
        assert!(
            err.contains("missing value `hostname` (a lowercase RFC 1123 host name), `vip`"),
            "{err}"
        );
        assert!(!err.contains("api_port"), "{err}");
        types(t)
            .check(&values("hostname = \"lb-1\"\nvip = \"10.0.0.1\"\n"))
            .unwrap();
    }

    #[test]
    fn a_missing_record_field_is_named_with_its_list_index() {
        let t = "backends = [{ name = \"hostname\", address = \"ip\" }]\n";
        let err = check_err(t, "backends = [{ name = \"s1\" }]\n");
        assert!(err.contains("missing value `backends[0].address`"), "{err}");
        assert!(err.starts_with("node.toml:1:"), "{err}");
    }

    #[test]
    fn lists_must_be_lists_and_not_empty() {
        let t = "peers = \"[ip]\"\n";
        assert!(check_err(t, "peers = \"10.0.0.2\"\n").contains("must be a list, each an IPv4"));
        assert!(check_err(t, "peers = []\n").contains("empty list"));
        let err = check_err(t, "peers = [\"10.0.0.2\", \"10.0.0.3 10.0.0.4\"]\n");
        assert!(err.contains("value `peers[1]`"), "{err}");
    }

    #[test]
    fn a_secret_that_is_not_of_its_type_is_named_but_not_shown() {
        let t = "token = \"token\"\nkey = \"pem\"\n";
        for v in [
            "token = \"s3cret with space\"\n",
            "token = \"ok\"\nkey = \"s3cret\"\n",
        ] {
            let err = check_err(t, v);
            assert!(err.contains("value `"), "{err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn types_file_mistakes_are_located() {
        let err = ValueTypes::parse("a = \"ip\"\nb = \"hostnmae\"\n", Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("t.toml:2:5:"), "{err}");
        assert!(err.contains("did you mean `hostname`?"), "{err}");
        for bad in ["c = 1\n", "c = [\"ip\", \"ip\"]\n", "c = \"int 5..=1\"\n"] {
            assert!(
                ValueTypes::parse(bad, Path::new("t.toml")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn json_values_are_checked_naming_the_file() {
        let v = Values::parse_json(
            "{\"node_ip\": \"10.0.2.15\\nx: 1\"}",
            Path::new("node.json"),
        )
        .unwrap();
        let err = types("node_ip = \"ip\"\n")
            .check(&v)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("node.json: value `node_ip`"), "{err}");
    }

    #[test]
    fn values_serialize_like_a_toml_table() {
        // The recipe digest covers test_values: it must not change with the
        // representation that keeps positions.
        let text = "b = 1\na = [\"x\", { c = true }]\nd = 1979-05-27T07:32:00Z\ne = 1.5\n";
        let table: toml::Table = toml::from_str(text).unwrap();
        assert_eq!(
            serde_json::to_string(&values(text)).unwrap(),
            serde_json::to_string(&table).unwrap()
        );
        assert_eq!(values(text).to_table(), table);
    }

    #[test]
    fn yaml_quote_round_trips_any_string_on_one_ascii_line() {
        for s in [
            "on",
            "~",
            "null",
            "*.k8s.example.com",
            "&anchor x",
            "!!binary x",
            "a: b # c",
            "10.0.2.15\n  - path: /etc/evil\n    content: x",
            "quote \" backslash \\ tab \t cr \r nul \0 del \x7f",
            "nel \u{85} ls \u{2028} ps \u{2029} bom \u{feff} emoji \u{1F600}",
            "",
        ] {
            let q = yaml_quote(s);
            assert!(q.bytes().all(|b| (0x20..0x7f).contains(&b)), "{q}");
            let doc: std::collections::BTreeMap<String, String> =
                serde_yaml::from_str(&format!("k: {q}\n")).unwrap_or_else(|e| panic!("{q}: {e}"));
            assert_eq!(doc["k"], s, "{q}");
        }
    }

    #[test]
    fn conf_word_accepts_addresses_and_refuses_separators() {
        for w in [
            "lb-1",
            "10.0.2.15",
            "fd00::10",
            "[fd00::21]",
            "eth0",
            "vlan.100",
        ] {
            assert_eq!(conf_word(w), Some(w));
        }
        for w in [
            "", "a b", "a\nb", "a#b", "a!b", "a\"b", "$X", "${X}", "a{", "}", "a\\b",
        ] {
            assert_eq!(conf_word(w), None, "{w:?}");
        }
    }

    #[test]
    fn url_host_brackets_ipv6_only() {
        assert_eq!(url_host("fd00::10"), "[fd00::10]");
        assert_eq!(url_host("10.0.2.15"), "10.0.2.15");
        assert_eq!(url_host("k8s.example.com"), "k8s.example.com");
    }
}
