//! The name a client certificate gives its holder, for a listener's `tls_username_from`.
//!
//! Owns: reading one field of an X.509 certificate that TLS has already verified: the subject's
//! common name (CN), or its first subjectAltName entry that names a holder (a DNS name, an
//! e-mail address or a URI, in the order the certificate lists them).
//! Never: verifies a certificate (rustls did, before any name is read), or makes up a name: a
//! certificate without the field, or whose field is not a usable MQTT username, gives an error
//! that the caller turns into a refused connection, never a fallback to anonymous.
//! Invariants: a name returned is non-empty valid UTF-8 of at most [`NAME_LEN_MAX`] bytes
//! without control characters (so it is a well-formed MQTT UTF-8 string, [MQTT-1.5.4-1/2]).

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The longest name taken: the longest MQTT UTF-8 string (a username in CONNECT is one).
pub const NAME_LEN_MAX: usize = 65_535;

/// Which field of a verified client certificate names the client (`tls_username_from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameFrom {
    /// None: the certificate only proves that the client holds one.
    None,
    /// The subject's first common name (CN).
    CommonName,
    /// The first subjectAltName entry that is a DNS name, an e-mail address or a URI.
    SubjectAltName,
}

impl NameFrom {
    /// From the configuration's spelling: `none`, `cn` or `san`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "none" => Some(Self::None),
            "cn" => Some(Self::CommonName),
            "san" => Some(Self::SubjectAltName),
            _ => None,
        }
    }
}

/// The name `from` reads in the certificate `der`; Ok(None) only for [`NameFrom::None`].
pub fn certificate_name(der: &[u8], from: NameFrom) -> Result<Option<String>, String> {
    if from == NameFrom::None {
        return Ok(None);
    }
    let (_, certificate) = X509Certificate::from_der(der)
        .map_err(|e| format!("the client certificate cannot be read: {e}"))?;
    let name = match from {
        NameFrom::None => return Ok(None),
        NameFrom::CommonName => common_name(&certificate)?,
        NameFrom::SubjectAltName => subject_alt_name(&certificate)?,
    };
    checked(name).map(Some)
}

fn common_name(certificate: &X509Certificate<'_>) -> Result<String, String> {
    let attribute = certificate
        .subject()
        .iter_common_name()
        .next()
        .ok_or("the client certificate's subject has no common name (CN)")?;
    attribute
        .as_str()
        .map(str::to_string)
        .map_err(|e| format!("the client certificate's common name is not a string: {e}"))
}

fn subject_alt_name(certificate: &X509Certificate<'_>) -> Result<String, String> {
    let extension = certificate
        .subject_alternative_name()
        .map_err(|e| format!("the client certificate's subjectAltName cannot be read: {e}"))?
        .ok_or("the client certificate has no subjectAltName")?;
    extension
        .value
        .general_names
        .iter()
        .find_map(|name| match name {
            GeneralName::DNSName(text) | GeneralName::RFC822Name(text) | GeneralName::URI(text) => {
                Some(text.to_string())
            }
            _ => None,
        })
        .ok_or_else(|| {
            "the client certificate's subjectAltName has no DNS name, e-mail address or URI".into()
        })
}

/// Refuses a name that no MQTT username could be (also a CN a balancer sent in its PROXY
/// header).
pub fn checked(name: String) -> Result<String, String> {
    if name.is_empty() {
        return Err("the client certificate's name is empty".into());
    }
    if name.len() > NAME_LEN_MAX {
        return Err(format!(
            "the client certificate's name is {} bytes long (at most {NAME_LEN_MAX})",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("the client certificate's name holds control characters".into());
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CN=node, subjectAltName DNS:testcluster (the cluster fixtures).
    const NODE_CERT: &[u8] = include_bytes!("testdata/node.pem");

    fn der(pem: &[u8]) -> Vec<u8> {
        crate::ingress::tls::certificates_from_pem(pem).unwrap()[0].to_vec()
    }

    #[test]
    fn the_common_name_and_the_first_alt_name_are_read() {
        let der = der(NODE_CERT);
        assert_eq!(
            certificate_name(&der, NameFrom::CommonName).unwrap(),
            Some("node".to_string())
        );
        assert_eq!(
            certificate_name(&der, NameFrom::SubjectAltName).unwrap(),
            Some("testcluster".to_string())
        );
        assert_eq!(certificate_name(&der, NameFrom::None).unwrap(), None);
    }

    #[test]
    fn garbage_is_an_error_not_a_name() {
        let error = certificate_name(b"\x30\x03\x02\x01", NameFrom::CommonName).unwrap_err();
        assert!(error.contains("cannot be read"), "{error}");
        // Not even parsed when no name is asked for.
        assert_eq!(certificate_name(b"junk", NameFrom::None).unwrap(), None);
    }

    #[test]
    fn unusable_names_are_refused() {
        assert!(checked(String::new()).is_err());
        assert!(checked("a\u{0}b".into()).is_err());
        assert!(checked("line\nbreak".into()).is_err());
        assert!(checked("x".repeat(NAME_LEN_MAX + 1)).is_err());
        assert_eq!(checked("device-42".into()).unwrap(), "device-42");
    }

    #[test]
    fn the_configuration_spellings() {
        assert_eq!(NameFrom::parse("cn"), Some(NameFrom::CommonName));
        assert_eq!(NameFrom::parse("san"), Some(NameFrom::SubjectAltName));
        assert_eq!(NameFrom::parse("none"), Some(NameFrom::None));
        assert_eq!(NameFrom::parse("CN"), None);
    }
}
