//! The OpenAPI 3.0 spec of the API (`api_server/openapi/skiff.yaml`, embedded in the crate) and
//! helpers for tests that check a server against it: the documented paths and methods, the
//! documented responses, and a validator for the JSON-schema subset the spec uses (`type`,
//! `properties`, `required`, `additionalProperties`, `items`, `enum`, `oneOf`, `$ref`,
//! `nullable`, `minimum`, `maximum`, `maxProperties`, `minProperties`).

use std::collections::BTreeMap;

use serde_json::Value;
use thiserror::Error;

/// The spec's YAML text.
pub const SPEC_YAML: &str = include_str!("../openapi/skiff.yaml");

/// HTTP methods an OpenAPI path item may hold.
const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

/// Errors loading the spec.
#[derive(Debug, Error)]
pub enum SpecError {
    /// The YAML does not parse.
    #[error("OpenAPI spec: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
    /// The document is not an OpenAPI 3.0 spec with `paths`.
    #[error("OpenAPI spec: {0}")]
    Shape(String),
}

/// The loaded spec.
#[derive(Debug, Clone)]
pub struct Spec {
    doc: Value,
}

/// One documented response of an operation.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseSpec {
    /// The response's JSON schema (`$ref`s unresolved), or `None` when it has no body.
    pub schema: Option<Value>,
}

impl Spec {
    /// The spec shipped with this crate.
    pub fn load() -> Spec {
        Spec::from_yaml(SPEC_YAML).expect("the embedded OpenAPI spec is valid")
    }

    /// Parse a spec from YAML (or JSON) text.
    pub fn from_yaml(text: &str) -> Result<Spec, SpecError> {
        let doc: Value = serde_yaml_ng::from_str(text)?;
        let version = doc.get("openapi").and_then(Value::as_str).unwrap_or("");
        if !version.starts_with("3.") {
            return Err(SpecError::Shape(format!(
                "openapi version {version:?} is not 3.x"
            )));
        }
        if !doc.get("paths").is_some_and(Value::is_object) {
            return Err(SpecError::Shape("no paths".into()));
        }
        Ok(Spec { doc })
    }

    /// The whole document as JSON.
    pub fn document(&self) -> &Value {
        &self.doc
    }

    /// Full request paths (server base path + spec path, e.g. `/api/v1/vm.info`) with their
    /// upper-case methods, sorted.
    pub fn routes(&self) -> Vec<(String, String)> {
        let base = self.base_path();
        let mut out = Vec::new();
        if let Some(paths) = self.doc["paths"].as_object() {
            for (p, item) in paths {
                for m in METHODS {
                    if item.get(*m).is_some() {
                        out.push((format!("{base}{p}"), m.to_ascii_uppercase()));
                    }
                }
            }
        }
        out.sort();
        out
    }

    /// The path prefix from `servers[0].url` (e.g. `/api/v1`), or empty.
    pub fn base_path(&self) -> String {
        let url = self.doc["servers"][0]["url"].as_str().unwrap_or("");
        let path = match url.find("://") {
            Some(i) => url[i + 3..].find('/').map_or("", |j| &url[i + 3 + j..]),
            None => url,
        };
        path.trim_end_matches('/').to_string()
    }

    fn operation(&self, full_path: &str, method: &str) -> Option<&Value> {
        let base = self.base_path();
        let p = full_path.strip_prefix(&base)?;
        self.doc["paths"]
            .get(p)?
            .get(method.to_ascii_lowercase().as_str())
    }

    /// The documented responses of `method full_path`, by status (`None` if undocumented).
    pub fn responses(&self, full_path: &str, method: &str) -> Option<BTreeMap<u16, ResponseSpec>> {
        let op = self.operation(full_path, method)?;
        let mut out = BTreeMap::new();
        for (code, resp) in op["responses"].as_object()? {
            let Ok(code) = code.parse::<u16>() else {
                continue;
            };
            let resp = self.resolve(resp);
            let schema = resp["content"]["application/json"]["schema"].clone();
            out.insert(
                code,
                ResponseSpec {
                    schema: (!schema.is_null()).then_some(schema),
                },
            );
        }
        Some(out)
    }

    /// The JSON schema of the request body of `method full_path`, when it takes one.
    pub fn request_schema(&self, full_path: &str, method: &str) -> Option<Value> {
        let op = self.operation(full_path, method)?;
        let body = self.resolve(op.get("requestBody")?);
        let s = body["content"]["application/json"]["schema"].clone();
        (!s.is_null()).then_some(s)
    }

    /// A named schema under `components/schemas`.
    pub fn schema(&self, name: &str) -> Option<&Value> {
        self.doc["components"]["schemas"].get(name)
    }

    /// Follow `$ref`s (local `#/...` only) until a non-reference object.
    pub fn resolve<'a>(&'a self, mut v: &'a Value) -> &'a Value {
        for _ in 0..16 {
            match v.get("$ref").and_then(Value::as_str) {
                Some(r) => {
                    let ptr = r.strip_prefix('#').unwrap_or(r);
                    match self.doc.pointer(ptr) {
                        Some(t) => v = t,
                        None => return &Value::Null,
                    }
                }
                None => return v,
            }
        }
        v
    }

    /// Check that an answer (`status`, body bytes) is one the spec documents for
    /// `method full_path`, with a body matching its schema.
    pub fn check_response(
        &self,
        full_path: &str,
        method: &str,
        status: u16,
        body: &[u8],
    ) -> Result<(), String> {
        let responses = self
            .responses(full_path, method)
            .ok_or_else(|| format!("{method} {full_path} is not in the spec"))?;
        let r = responses.get(&status).ok_or_else(|| {
            format!(
                "{method} {full_path}: status {status} is not documented (documented: {:?})",
                responses.keys().collect::<Vec<_>>()
            )
        })?;
        match &r.schema {
            None if body.is_empty() => Ok(()),
            None => Err(format!(
                "{method} {full_path} {status}: documented without a body, got {:?}",
                String::from_utf8_lossy(body)
            )),
            Some(schema) => {
                let v: Value = serde_json::from_slice(body)
                    .map_err(|e| format!("{method} {full_path} {status}: body is not JSON: {e}"))?;
                self.validate(schema, &v)
                    .map_err(|e| format!("{method} {full_path} {status}: {e}"))
            }
        }
    }

    /// Validate `instance` against `schema` (the subset listed in the module docs).
    pub fn validate(&self, schema: &Value, instance: &Value) -> Result<(), String> {
        self.validate_at(schema, instance, "$")
    }

    fn validate_at(&self, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
        let s = self.resolve(schema);
        if v.is_null() && s.get("nullable").and_then(Value::as_bool) == Some(true) {
            return Ok(());
        }
        if let Some(one_of) = s.get("oneOf").and_then(Value::as_array) {
            let matches = one_of
                .iter()
                .filter(|alt| self.validate_at(alt, v, at).is_ok())
                .count();
            if matches != 1 {
                return Err(format!(
                    "{at}: {v} matches {matches} of the oneOf alternatives (want exactly 1)"
                ));
            }
        }
        if let Some(choices) = s.get("enum").and_then(Value::as_array) {
            if !choices.contains(v) {
                return Err(format!("{at}: {v} is not one of {choices:?}"));
            }
        }
        if let Some(t) = s.get("type").and_then(Value::as_str) {
            let ok = match t {
                "object" => v.is_object(),
                "array" => v.is_array(),
                "string" => v.is_string(),
                "boolean" => v.is_boolean(),
                "integer" => v.is_i64() || v.is_u64(),
                "number" => v.is_number(),
                other => return Err(format!("{at}: schema type {other:?} unsupported")),
            };
            if !ok {
                return Err(format!("{at}: expected {t}, got {v}"));
            }
        }
        if let Some(min) = s.get("minimum").and_then(Value::as_f64) {
            if v.as_f64().is_some_and(|n| n < min) {
                return Err(format!("{at}: {v} is below the minimum {min}"));
            }
        }
        if let Some(max) = s.get("maximum").and_then(Value::as_f64) {
            if v.as_f64().is_some_and(|n| n > max) {
                return Err(format!("{at}: {v} is above the maximum {max}"));
            }
        }
        if let Some(obj) = v.as_object() {
            let props = s.get("properties").and_then(Value::as_object);
            if let Some(req) = s.get("required").and_then(Value::as_array) {
                for r in req.iter().filter_map(Value::as_str) {
                    if !obj.contains_key(r) {
                        return Err(format!("{at}: required property {r:?} is missing"));
                    }
                }
            }
            for (k, val) in obj {
                let here = format!("{at}.{k}");
                match props.and_then(|p| p.get(k)) {
                    Some(ps) => self.validate_at(ps, val, &here)?,
                    None => match s.get("additionalProperties") {
                        Some(Value::Bool(false)) => {
                            return Err(format!("{at}: property {k:?} is not documented"))
                        }
                        Some(extra) if extra.is_object() => self.validate_at(extra, val, &here)?,
                        _ => {}
                    },
                }
            }
            if let Some(n) = s.get("minProperties").and_then(Value::as_u64) {
                if (obj.len() as u64) < n {
                    return Err(format!("{at}: fewer than {n} properties"));
                }
            }
            if let Some(n) = s.get("maxProperties").and_then(Value::as_u64) {
                if (obj.len() as u64) > n {
                    return Err(format!("{at}: more than {n} properties"));
                }
            }
        }
        if let (Some(items), Some(arr)) = (s.get("items"), v.as_array()) {
            for (i, item) in arr.iter().enumerate() {
                self.validate_at(items, item, &format!("{at}[{i}]"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VmConfig;
    use serde_json::json;

    #[test]
    fn spec_lists_exactly_the_served_routes() {
        let spec = Spec::load();
        assert_eq!(spec.base_path(), "/api/v1");
        let mut served: Vec<(String, String)> = crate::ROUTES
            .iter()
            .map(|r| (r.path.to_string(), r.method.to_string()))
            .collect();
        served.sort();
        assert_eq!(spec.routes(), served);
    }

    #[test]
    fn every_operation_documents_errors_and_refs_resolve() {
        let spec = Spec::load();
        for (path, method) in spec.routes() {
            let r = spec.responses(&path, &method).unwrap();
            for code in [400, 405, 500, 503] {
                assert!(r.contains_key(&code), "{method} {path} lacks {code}");
            }
            // vm.migration-progress answers with or without a VM (phase none).
            assert_eq!(
                r.contains_key(&409),
                path.contains("/vm.") && !path.ends_with("/vm.migration-progress"),
                "{method} {path}: 409"
            );
            // 404 is for undocumented paths only (components/responses/NotFound).
            assert!(!r.contains_key(&404), "{method} {path}");
            assert!(
                r.contains_key(&200) || r.contains_key(&204),
                "{method} {path}"
            );
            for resp in r.values() {
                if let Some(s) = &resp.schema {
                    assert!(!spec.resolve(s).is_null(), "{method} {path}: dangling $ref");
                }
            }
        }
        assert!(!spec
            .resolve(&serde_json::json!({"$ref": "#/components/responses/NotFound"}))
            .is_null());
        // Every $ref anywhere in the document resolves.
        fn refs(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(r)) = m.get("$ref") {
                        out.push(r.clone());
                    }
                    m.values().for_each(|x| refs(x, out));
                }
                Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        refs(spec.document(), &mut all);
        for r in all {
            assert!(
                spec.document().pointer(&r[1..]).is_some(),
                "dangling $ref {r}"
            );
        }
    }

    #[test]
    fn migration_schemas_match_the_models() {
        use crate::migration::*;
        use crate::models::VmState;
        let spec = Spec::load();
        let check = |name: &str, v: Value| {
            spec.validate(
                &json!({ "$ref": format!("#/components/schemas/{name}") }),
                &v,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        let url = |s: &str| MigrationUrl::parse(s).unwrap();
        let mut send = SendMigrationRequest::new(url("unix:/run/m.sock"));
        check("SendMigrationRequest", serde_json::to_value(&send).unwrap());
        send.local = true;
        send.connections = MAX_CONNECTIONS;
        send.downtime_limit_ms = MAX_DOWNTIME_LIMIT_MS;
        send.bandwidth_limit_mbps = Some(MAX_BANDWIDTH_LIMIT_MBPS);
        send.max_iterations = Some(MAX_ITERATIONS);
        check("SendMigrationRequest", serde_json::to_value(&send).unwrap());
        let mut recv = ReceiveMigrationRequest::new(url("tcp:[::1]:6000"));
        check(
            "ReceiveMigrationRequest",
            serde_json::to_value(&recv).unwrap(),
        );
        recv.overrides.insert(
            "net0".into(),
            DeviceOverride {
                tap: Some("tap1".into()),
                ..Default::default()
            },
        );
        check(
            "ReceiveMigrationRequest",
            serde_json::to_value(&recv).unwrap(),
        );
        check(
            "MigrationProgress",
            serde_json::to_value(MigrationProgress::default()).unwrap(),
        );
        for phase in MigrationPhase::ALL {
            let p = MigrationProgress {
                phase,
                iteration: 7,
                bytes_sent: u64::MAX,
                throttle_percent: 99,
                error: Some("e".into()),
                downtime_ms: Some(3),
                ..Default::default()
            };
            check("MigrationProgress", serde_json::to_value(p).unwrap());
        }
        for s in [
            VmState::Created,
            VmState::Running,
            VmState::Paused,
            VmState::Shutdown,
            VmState::Migrating,
            VmState::Migrated,
        ] {
            check("VmState", serde_json::to_value(s).unwrap());
        }
        assert!(spec
            .validate(
                &json!({"$ref": "#/components/schemas/DeviceOverride"}),
                &json!({"path": "/a", "tap": "t"})
            )
            .is_err());
    }

    #[test]
    fn vm_config_schema_matches_the_model() {
        let spec = Spec::load();
        let schema = json!({"$ref": "#/components/schemas/VmConfig"});
        let full: VmConfig = serde_json::from_value(json!({
            "cpus": {"boot_vcpus": 2}, "memory": {"size": 1073741824},
            "payload": {"kernel": "/k", "initramfs": "/i", "cmdline": "console=ttyS0"},
            "serial": {"file": "/s"}, "cpu_template": "/t",
            "disks": [{"path": "/d", "readonly": true, "id": "root", "serial": "s1", "iommu": true}],
            "nets": [{"tap": {"name": "tap0"}, "mac": "52:54:00:12:34:56", "id": "n", "iommu": false},
                     {"tap": {"fd": 3}}],
            "console": "pty", "rng": {"id": "r", "iommu": false}
        }))
        .unwrap();
        for c in [VmConfig::default(), full] {
            let v = serde_json::to_value(&c).unwrap();
            spec.validate(&schema, &v).unwrap();
        }
        for s in ["off", "stdout"] {
            spec.validate(&schema, &json!({ "serial": s })).unwrap();
        }
        spec.validate(&schema, &json!({"console": {"file": "/c"}}))
            .unwrap();
        spec.validate(&schema, &json!({})).unwrap();
        assert!(spec.validate(&schema, &json!({"cpu": {}})).is_err());
        assert!(spec.validate(&schema, &json!({"serial": "tty"})).is_err());
        assert!(spec
            .validate(&schema, &json!({"cpus": {"boot_vcpus": "x"}}))
            .is_err());
        assert!(spec
            .validate(&schema, &json!({"nets": [{"tap": {"name": "a", "fd": 3}}]}))
            .is_err());
    }
}
