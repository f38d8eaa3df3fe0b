//! Manifest parsing: multi-document YAML, JSON (one value, several concatenated, or an
//! array) and `List` kinds into typed [`Object`]s.
//!
//! Parsing is strict where the k8s-openapi types are lenient: their `Deserialize` impls
//! skip unknown fields, so a typo such as `imagee` would silently vanish. We wrap the
//! deserializer with `serde_ignored` to catch every skipped key, and with
//! `serde_path_to_error` so type errors name the field path.

use std::fmt;

use serde::Deserialize;
use serde_json::Value;

use crate::object::{Kind, Object};

/// Where in the input a problem is: the 1-based document number and, inside a `List`,
/// the 0-based item index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub document: usize,
    pub item: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.document)?;
        if let Some(item) = self.item {
            write!(f, " item {item}")?;
        }
        Ok(())
    }
}

/// Why a manifest could not be turned into objects. Each variant renders as one line
/// naming the document (and the object, once its kind is known).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("document {document}: malformed {format} at line {line}, column {column}: {message}")]
    Syntax {
        format: &'static str,
        document: usize,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{at}: expected an object with apiVersion and kind, found {found}")]
    NotAnObject { at: Location, found: &'static str },
    #[error("{at}: missing {field}")]
    MissingField { at: Location, field: &'static str },
    #[error("{at}: unsupported kind {kind:?} with apiVersion {api_version:?}")]
    UnknownKind {
        at: Location,
        api_version: String,
        kind: String,
    },
    #[error("{at} ({object}): unknown field {path:?}")]
    UnknownField {
        at: Location,
        object: String,
        path: String,
    },
    #[error("{at} ({object}): {}", field_message(path, message))]
    InvalidValue {
        at: Location,
        object: String,
        path: String,
        message: String,
    },
}

/// `path: message`, or just the message when the problem is at the top level.
fn field_message(path: &str, message: &str) -> String {
    if path.is_empty() || path == "." {
        message.to_owned()
    } else {
        format!("{path}: {message}")
    }
}

/// Parses every object in `input` (YAML or JSON), in document order. Documents are
/// numbered from 1, counting only non-empty ones.
pub fn parse(input: &str) -> Result<Vec<Object>, ManifestError> {
    if looks_like_json(input) {
        let mut objects = Vec::new();
        let values = json_documents(input)?.into_iter().filter(|v| !v.is_null());
        for (index, value) in values.enumerate() {
            objects_of_document(index + 1, value, &mut objects)?;
        }
        return Ok(objects);
    }
    parse_yaml(input)
}

fn looks_like_json(input: &str) -> bool {
    matches!(input.trim_start().as_bytes().first(), Some(b'{' | b'['))
}

/// Below this many documents, parsing on one thread is faster than spawning.
const PARALLEL_MIN_DOCUMENTS: usize = 256;

/// YAML parsing (libyaml) dominates applying a big manifest, and documents are
/// independent, so large inputs are split at `---` lines and parsed on several threads.
fn parse_yaml(input: &str) -> Result<Vec<Object>, ManifestError> {
    let chunks = split_documents(input);
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(8);
    let results: Vec<ChunkResult> = if chunks.len() < PARALLEL_MIN_DOCUMENTS || threads == 1 {
        chunks.iter().map(parse_chunk).collect()
    } else {
        let per_thread = chunks.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let workers: Vec<_> = chunks
                .chunks(per_thread)
                .map(|group| scope.spawn(move || group.iter().map(parse_chunk).collect::<Vec<_>>()))
                .collect();
            workers
                .into_iter()
                .flat_map(|w| {
                    w.join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        })
    };
    let mut objects = Vec::new();
    let mut documents_before = 0;
    for result in results {
        let documents = result.map_err(|e| e.after_documents(documents_before))?;
        documents_before += documents.len();
        objects.extend(documents.into_iter().flatten());
    }
    Ok(objects)
}

/// Part of the input between two `---` lines; `first_line` is the 0-based line it
/// starts on, to report positions in the whole input.
struct Chunk<'a> {
    text: &'a str,
    first_line: usize,
}

/// Splits at lines that are exactly `---` (a document marker wherever it appears in
/// YAML). Markers with content after them (`--- |`) stay inside a chunk, whose parser
/// handles them, so the split never changes what a document contains.
fn split_documents(input: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let (mut start, mut first_line, mut offset) = (0, 0, 0);
    for (line_no, line) in input.split_inclusive('\n').enumerate() {
        if line.trim_end() == "---" {
            chunks.push(Chunk {
                text: &input[start..offset],
                first_line,
            });
            start = offset + line.len();
            first_line = line_no + 1;
        }
        offset += line.len();
    }
    chunks.push(Chunk {
        text: &input[start..],
        first_line,
    });
    chunks
}

/// The objects of each non-empty document of a chunk, or an error numbered within it.
type ChunkResult = Result<Vec<Vec<Object>>, ManifestError>;

fn parse_chunk(chunk: &Chunk<'_>) -> ChunkResult {
    let mut documents = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(chunk.text) {
        let value = Value::deserialize(doc).map_err(|e| {
            let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            ManifestError::Syntax {
                format: "YAML",
                document: documents.len() + 1,
                line: line + chunk.first_line,
                column,
                message: strip_location_suffix(&e.to_string()),
            }
        })?;
        if !value.is_null() {
            let mut objects = Vec::with_capacity(1);
            objects_of_document(documents.len() + 1, value, &mut objects)?;
            documents.push(objects);
        }
    }
    Ok(documents)
}

impl ManifestError {
    /// Renumbers an error found in a chunk for the documents that precede the chunk.
    fn after_documents(mut self, before: usize) -> ManifestError {
        match &mut self {
            ManifestError::Syntax { document, .. } => *document += before,
            ManifestError::NotAnObject { at, .. }
            | ManifestError::MissingField { at, .. }
            | ManifestError::UnknownKind { at, .. }
            | ManifestError::UnknownField { at, .. }
            | ManifestError::InvalidValue { at, .. } => at.document += before,
        }
        self
    }
}

/// serde_yaml_ng appends " at line X column Y" to its messages; we report the position
/// in our own fields, so drop the duplicate.
fn strip_location_suffix(message: &str) -> String {
    match message.find(" at line ") {
        Some(pos) => message[..pos].to_owned(),
        None => message.to_owned(),
    }
}

fn json_documents(input: &str) -> Result<Vec<Value>, ManifestError> {
    let mut out = Vec::new();
    for value in serde_json::Deserializer::from_str(input).into_iter::<Value>() {
        let value = value.map_err(|e| ManifestError::Syntax {
            format: "JSON",
            document: out.len() + 1,
            line: e.line(),
            column: e.column(),
            message: strip_location_suffix(&e.to_string()),
        })?;
        match value {
            // A bare JSON array is a sequence of documents.
            Value::Array(items) => out.extend(items),
            other => out.push(other),
        }
    }
    Ok(out)
}

fn objects_of_document(
    document: usize,
    value: Value,
    out: &mut Vec<Object>,
) -> Result<(), ManifestError> {
    let at = Location {
        document,
        item: None,
    };
    let (api_version, kind) = type_of(at, &value)?;
    if kind == "List" || (kind.ends_with("List") && Kind::from_type(&api_version, &kind).is_none())
    {
        return objects_of_list(document, value, out);
    }
    out.push(typed_object(at, value)?);
    Ok(())
}

fn objects_of_list(
    document: usize,
    value: Value,
    out: &mut Vec<Object>,
) -> Result<(), ManifestError> {
    let at = Location {
        document,
        item: None,
    };
    let Value::Object(mut map) = value else {
        unreachable!("type_of checked for an object")
    };
    let items = match map.remove("items") {
        Some(Value::Array(items)) => items,
        Some(Value::Null) | None => Vec::new(),
        Some(_) => {
            return Err(ManifestError::InvalidValue {
                at,
                object: "List".into(),
                path: "items".into(),
                message: "must be a list".into(),
            });
        }
    };
    for (index, item) in items.into_iter().enumerate() {
        out.push(typed_object(
            Location {
                document,
                item: Some(index),
            },
            item,
        )?);
    }
    Ok(())
}

fn type_of(at: Location, value: &Value) -> Result<(String, String), ManifestError> {
    let Value::Object(map) = value else {
        return Err(ManifestError::NotAnObject {
            at,
            found: json_type_name(value),
        });
    };
    let field = |name: &'static str| {
        map.get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or(ManifestError::MissingField { at, field: name })
    };
    Ok((field("apiVersion")?, field("kind")?))
}

fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Deserializes one object strictly: unknown fields and type errors name their path.
pub(crate) fn typed_object(at: Location, value: Value) -> Result<Object, ManifestError> {
    let (api_version, kind_name) = type_of(at, &value)?;
    let kind =
        Kind::from_type(&api_version, &kind_name).ok_or_else(|| ManifestError::UnknownKind {
            at,
            api_version: api_version.clone(),
            kind: kind_name.clone(),
        })?;
    let object = describe(kind, &value);
    let mut unknown: Option<String> = None;
    // Fast path: no path tracking (it allocates per field); only on failure run again
    // with serde_path_to_error to name the offending field.
    let parsed = deserialize_kind(kind, &value, &mut |path| {
        unknown.get_or_insert_with(|| render_ignored_path(&path));
    })
    .map_err(|_| type_error(at, &object, kind, &value))?;
    match unknown {
        Some(path) => Err(ManifestError::UnknownField { at, object, path }),
        None => Ok(parsed),
    }
}

fn type_error(at: Location, object: &str, kind: Kind, value: &Value) -> ManifestError {
    fn with_path<T: serde::de::DeserializeOwned>(
        value: &Value,
    ) -> Option<serde_path_to_error::Error<serde_json::Error>> {
        serde_path_to_error::deserialize::<_, T>(value).err()
    }
    use k8s_openapi::api::{apps::v1 as apps, core::v1 as core, discovery::v1 as discovery};
    let error = match kind {
        Kind::Namespace => with_path::<core::Namespace>(value),
        Kind::Pod => with_path::<core::Pod>(value),
        Kind::Deployment => with_path::<apps::Deployment>(value),
        Kind::ReplicaSet => with_path::<apps::ReplicaSet>(value),
        Kind::Service => with_path::<core::Service>(value),
        Kind::EndpointSlice => with_path::<discovery::EndpointSlice>(value),
        Kind::ConfigMap => with_path::<core::ConfigMap>(value),
        Kind::Secret => with_path::<core::Secret>(value),
    };
    let (path, message) = error.map_or_else(
        || (String::new(), "invalid value".to_owned()),
        |e| (e.path().to_string(), e.into_inner().to_string()),
    );
    ManifestError::InvalidValue {
        at,
        object: object.to_owned(),
        path,
        message,
    }
}

/// Deserializes from a borrowed value so the error path can run again on it.
fn deserialize_kind(
    kind: Kind,
    value: &Value,
    mut on_ignored: &mut dyn FnMut(serde_ignored::Path<'_>),
) -> Result<Object, serde_json::Error> {
    macro_rules! strict {
        () => {
            serde_ignored::Deserializer::new(value, &mut on_ignored)
        };
    }
    Ok(match kind {
        Kind::Namespace => Object::Namespace(Deserialize::deserialize(strict!())?),
        Kind::Pod => Object::Pod(Deserialize::deserialize(strict!())?),
        Kind::Deployment => Object::Deployment(Deserialize::deserialize(strict!())?),
        Kind::ReplicaSet => Object::ReplicaSet(Deserialize::deserialize(strict!())?),
        Kind::Service => Object::Service(Deserialize::deserialize(strict!())?),
        Kind::EndpointSlice => Object::EndpointSlice(Deserialize::deserialize(strict!())?),
        Kind::ConfigMap => Object::ConfigMap(Deserialize::deserialize(strict!())?),
        Kind::Secret => Object::Secret(Deserialize::deserialize(strict!())?),
    })
}

/// `service/default/web` from the raw value, for messages before the typed parse.
fn describe(kind: Kind, value: &Value) -> String {
    let meta = value.get("metadata");
    let get = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_str);
    let name = get("name").or(get("generateName")).unwrap_or("<unnamed>");
    if kind.is_namespaced() {
        format!(
            "{}/{}/{}",
            kind.singular(),
            get("namespace").unwrap_or(crate::DEFAULT_NAMESPACE),
            name
        )
    } else {
        format!("{}/{}", kind.singular(), name)
    }
}

/// Renders `spec.containers[0].imagee` (serde_ignored's own Display uses `.0` and `?`).
fn render_ignored_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", render_ignored_path(parent)),
        Path::Map { parent, key } => {
            let parent = render_ignored_path(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => render_ignored_path(parent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MULTI: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: host
        command: ["vipr-netexec"]
        ports:
        - {name: http, containerPort: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports:
  - {port: 80, targetPort: http}
---
"#;

    #[test]
    fn parses_multi_document_yaml_into_typed_objects() {
        let objects = parse(MULTI).unwrap();
        let kinds: Vec<Kind> = objects.iter().map(Object::kind).collect();
        assert_eq!(kinds, [Kind::Namespace, Kind::Deployment, Kind::Service]);
        let svc = objects[2].as_service().unwrap();
        assert_eq!(
            svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port,
            80
        );
    }

    #[test]
    fn parses_json_and_lists() {
        let json = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a"},"data":{"k":"v"}},
            {"apiVersion":"v1","kind":"Secret","metadata":{"name":"b"},"data":{"k":"dmFsdWU="}}]}"#;
        let objects = parse(json).unwrap();
        assert_eq!(objects.len(), 2);
        let Object::Secret(s) = &objects[1] else {
            panic!()
        };
        assert_eq!(s.data.as_ref().unwrap()["k"].0, b"value");
        let yaml_list = "apiVersion: v1\nkind: ServiceList\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n";
        assert_eq!(parse(yaml_list).unwrap()[0].kind(), Kind::Service);
    }

    #[test]
    fn unknown_field_is_reported_with_its_path() {
        let bad = MULTI.replace("image: host", "imagee: host");
        let err = parse(&bad).unwrap_err();
        assert_eq!(
            err.to_string(),
            "document 2 (deployment/shop/web): unknown field \"spec.template.spec.containers[0].imagee\""
        );
    }

    #[test]
    fn unknown_top_level_and_metadata_fields_are_errors() {
        let err = parse("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, lables: {}}\n")
            .unwrap_err();
        assert!(
            matches!(err, ManifestError::UnknownField { ref path, .. } if path == "metadata.lables"),
            "{err}"
        );
        let err =
            parse("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\nspec: {}\n").unwrap_err();
        assert!(
            matches!(err, ManifestError::UnknownField { ref path, .. } if path == "spec"),
            "{err}"
        );
    }

    #[test]
    fn unknown_kind_names_kind_and_document() {
        let err = parse("---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: batch/v1\nkind: Job\nmetadata: {name: j}\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "document 2: unsupported kind \"Job\" with apiVersion \"batch/v1\""
        );
        let err = parse("apiVersion: v2\nkind: Service\n").unwrap_err();
        assert!(matches!(err, ManifestError::UnknownKind { .. }));
    }

    #[test]
    fn malformed_yaml_reports_line_and_column() {
        let err = parse("apiVersion: v1\nkind: Service\nmetadata:\n  name: [web\n").unwrap_err();
        let ManifestError::Syntax { line, column, .. } = err else {
            panic!("{err}")
        };
        assert!(line >= 4, "line {line} column {column}");
        let err = parse("{\"apiVersion\": \"v1\",\n \"kind\": }").unwrap_err();
        assert!(
            matches!(
                err,
                ManifestError::Syntax {
                    format: "JSON",
                    line: 2,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn type_errors_name_the_field() {
        let err = parse("apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports:\n  - port: eighty\n").unwrap_err();
        let ManifestError::InvalidValue { path, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(path, "spec.ports[0].port");
    }

    #[test]
    fn missing_kind_and_non_objects_are_errors() {
        assert!(matches!(
            parse("apiVersion: v1\n").unwrap_err(),
            ManifestError::MissingField { field: "kind", .. }
        ));
        assert!(matches!(
            parse("- a\n- b\n").unwrap_err(),
            ManifestError::NotAnObject { .. }
        ));
    }

    #[test]
    fn large_inputs_parse_in_parallel_with_exact_positions() {
        // Each document is 3 lines plus its `---` line; document n starts at line 4n-2.
        let mut text = String::from("---\n");
        for i in 0..400 {
            text.push_str(&format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c{i}}}\n---\n"
            ));
        }
        let objects = parse(&text).unwrap();
        assert_eq!(objects.len(), 400);
        assert_eq!(objects[399].metadata().name.as_deref(), Some("c399"));

        let broken = text.replacen("name: c299}", "name: [c299}", 1);
        let ManifestError::Syntax { document, line, .. } = parse(&broken).unwrap_err() else {
            panic!()
        };
        assert_eq!(document, 300);
        assert!((1198..=1202).contains(&line), "line {line}");

        let unknown = text.replacen("name: c350}", "name: c350, nam: x}", 1);
        assert_eq!(
            parse(&unknown).unwrap_err().to_string(),
            "document 351 (configmap/default/c350): unknown field \"metadata.nam\""
        );
    }

    #[test]
    fn markers_with_content_are_left_to_the_yaml_parser() {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n--- # second\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n";
        assert_eq!(split_documents(text).len(), 1);
        assert_eq!(parse(text).unwrap().len(), 2);
        let crlf = "apiVersion: v1\r\nkind: ConfigMap\r\nmetadata: {name: a}\r\n---\r\napiVersion: v1\r\nkind: ConfigMap\r\nmetadata: {name: b}\r\n";
        assert_eq!(parse(crlf).unwrap().len(), 2);
    }

    #[test]
    fn type_errors_read_as_one_line() {
        // k8s-openapi defaults absent required fields (validation reports those), so
        // the parse-time errors are type mismatches.
        let yaml = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: 5\n";
        let message = parse(yaml).unwrap_err().to_string();
        assert!(
            message
                .starts_with("document 1 (configmap/default/c): data: invalid type: integer `5`"),
            "{message}"
        );
    }
}
