//! Test certificates for migration over TLS: a CA that signs leaves (valid or expired), and the
//! PEM files of one side written to a directory.

use std::path::Path;

use api_server::migration::MigrationTls;
use rcgen::{date_time_ymd, BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A certificate authority for tests.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// Its certificate (PEM).
    pub pem: String,
}

/// A leaf certificate and its key (PEM).
pub struct Leaf {
    /// The certificate.
    pub cert: String,
    /// The private key.
    pub key: String,
}

impl TestCa {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        let pem = params.self_signed(&key).expect("CA certificate").pem();
        Self {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A leaf for `host` (a name or an address), valid now unless `expired` (2020 to 2021).
    pub fn leaf(&self, host: &str, expired: bool) -> Leaf {
        let mut params = CertificateParams::new(vec![host.to_string()]).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, host);
        if expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// Write one side's files to `dir` (`NAME-cert.pem`, `NAME-key.pem`, `NAME-ca.pem`, the last
/// holding `trusts`' certificate); returns them as a request's `tls`.
pub fn write_side(dir: &Path, name: &str, leaf: &Leaf, trusts: &TestCa) -> MigrationTls {
    let path = |f: &str| dir.join(format!("{name}-{f}.pem"));
    std::fs::write(path("cert"), &leaf.cert).expect("write certificate");
    std::fs::write(path("key"), &leaf.key).expect("write key");
    std::fs::write(path("ca"), &trusts.pem).expect("write CA");
    MigrationTls {
        cert: path("cert"),
        key: path("key"),
        ca: path("ca"),
    }
}

/// The `--tls-cert/--tls-key/--tls-ca` options of skiff-remote for `tls`.
pub fn remote_args(tls: &MigrationTls) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        tls.cert.display().to_string(),
        "--tls-key".into(),
        tls.key.display().to_string(),
        "--tls-ca".into(),
        tls.ca.display().to_string(),
    ]
}
