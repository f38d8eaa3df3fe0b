//! `pod-template-hash`: a short, stable name for one pod template, as the
//! Kubernetes Deployment controller computes it (FNV-1a over the template,
//! then the decimal hash spelled in a DNS-safe, vowel-free alphabet).
//!
//! Kubernetes hashes Go's `spew` dump of the template; we hash its JSON
//! (k8s-openapi serializes maps sorted and fields in a fixed order), so the
//! value is stable across runs and restarts but not equal to a real
//! cluster's for the same template.

use k8s_openapi::api::core::v1::PodTemplateSpec;

/// The alphabet of `rand.SafeEncodeString` (no vowels: no words by accident).
const SAFE_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// The hash of `template`; `collision_count` (the Deployment's
/// `status.collisionCount`) changes it when a name is already taken.
pub fn pod_template_hash(template: &PodTemplateSpec, collision_count: Option<i32>) -> String {
    let json = serde_json::to_vec(template).expect("a pod template serializes");
    let mut hash = fnv1a32(FNV_OFFSET, &json);
    if let Some(count) = collision_count.filter(|c| *c > 0) {
        hash = fnv1a32(hash, &(count as u32).to_le_bytes());
    }
    safe_encode(&hash.to_string())
}

const FNV_OFFSET: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

fn fnv1a32(mut hash: u32, bytes: &[u8]) -> u32 {
    for byte in bytes {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// Each character mapped into [`SAFE_ALPHABET`] by its code, as Kubernetes'
/// `rand.SafeEncodeString` does.
fn safe_encode(s: &str) -> String {
    s.bytes()
        .map(|b| SAFE_ALPHABET[usize::from(b) % SAFE_ALPHABET.len()] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec};

    fn template(image: &str) -> PodTemplateSpec {
        PodTemplateSpec {
            metadata: None,
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "web".into(),
                    image: Some(image.into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        }
    }

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        assert_eq!(fnv1a32(FNV_OFFSET, b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(FNV_OFFSET, b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(FNV_OFFSET, b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn safe_encoding_is_kubernetes_alphabet() {
        // '0' is 48: 48 % 27 = 21 -> '4'; '9' is 57: 57 % 27 = 3 -> 'f'.
        assert_eq!(safe_encode("09"), "4f");
    }

    #[test]
    fn hash_is_stable_safe_and_follows_the_template() {
        let a = pod_template_hash(&template("nginx:1"), None);
        assert_eq!(a, pod_template_hash(&template("nginx:1"), None));
        assert_ne!(a, pod_template_hash(&template("nginx:2"), None));
        assert_ne!(a, pod_template_hash(&template("nginx:1"), Some(1)));
        assert_eq!(a, pod_template_hash(&template("nginx:1"), Some(0)));
        assert!(!a.is_empty() && a.len() <= 10, "{a}");
        assert!(a.bytes().all(|b| SAFE_ALPHABET.contains(&b)), "{a}");
    }
}
