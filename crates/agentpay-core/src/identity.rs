//! Who may pay as an agent. Step Functions passes no caller identity to the steps, so the
//! entry point (a Lambda function URL with IAM auth, which verifies the caller's SigV4
//! signature before the function runs) writes the caller's ARN into the execution input, and
//! CheckSpend refuses an execution whose agent's policy does not bind that caller.
//!
//! A policy binds IAM roles (or users) by ARN. A role's caller arrives as an STS
//! assumed-role ARN (`arn:aws:sts::ACCOUNT:assumed-role/NAME/SESSION`), which carries neither
//! the role's path nor its IAM ARN: it matches a bound role of the same partition, account and
//! name, whatever the session.

use serde::{Deserialize, Serialize};

/// Longest ARN accepted: IAM's own limit for a role ARN is 2048 characters.
pub const MAX_ARN_LEN: usize = 2048;

/// A verified caller, as the entry point saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Caller {
    pub arn: String,
}

/// An IAM identity reduced to what two ARNs of it share.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Identity {
    Role { partition: String, account: String, name: String },
    User { partition: String, account: String, path_and_name: String },
}

fn split_arn(arn: &str) -> Option<(&str, &str, &str, &str)> {
    let mut parts = arn.splitn(6, ':');
    let (prefix, partition, service, region, account, resource) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let account_ok = account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit());
    let partition_ok = ["aws", "aws-cn", "aws-us-gov"].contains(&partition);
    (prefix == "arn" && partition_ok && region.is_empty() && account_ok && !resource.is_empty())
        .then_some((partition, service, account, resource))
}

fn name_ok(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.chars().all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c))
}

fn identity(arn: &str) -> Option<Identity> {
    if arn.len() > MAX_ARN_LEN {
        return None;
    }
    let (partition, service, account, resource) = split_arn(arn)?;
    let (partition, account) = (partition.to_owned(), account.to_owned());
    match service {
        "sts" => {
            let rest = resource.strip_prefix("assumed-role/")?;
            let (name, session) = rest.split_once('/')?;
            (name_ok(name) && !session.is_empty()).then(|| Identity::Role { partition, account, name: name.to_owned() })
        }
        "iam" => {
            if let Some(path_and_name) = resource.strip_prefix("role/") {
                let name = path_and_name.rsplit('/').next()?;
                name_ok(name).then(|| Identity::Role { partition, account, name: name.to_owned() })
            } else if let Some(path_and_name) = resource.strip_prefix("user/") {
                let name = path_and_name.rsplit('/').next()?;
                name_ok(name).then(|| Identity::User { partition, account, path_and_name: path_and_name.to_owned() })
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Checks a caller ARN as the entry point hands it over; the error is the "expected …" text.
pub fn check_caller_arn(arn: &str) -> Result<(), String> {
    identity(arn).map(|_| ()).ok_or_else(|| {
        "an IAM caller ARN (arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION, arn:aws:iam::ACCOUNT:role/ROLE or arn:aws:iam::ACCOUNT:user/USER)".into()
    })
}

/// Checks an ARN a policy binds; the error is the "expected …" text.
pub fn check_principal_arn(arn: &str) -> Result<(), String> {
    match identity(arn) {
        Some(_) if arn.contains(":iam::") => Ok(()),
        _ => Err("an IAM role or user ARN (arn:aws:iam::ACCOUNT:role/NAME or arn:aws:iam::ACCOUNT:user/NAME)".into()),
    }
}

/// Whether `caller` is one of `principals`.
pub fn is_bound(caller: &str, principals: &[String]) -> bool {
    let Some(caller) = identity(caller) else { return false };
    principals.iter().filter_map(|p| identity(p)).any(|principal| principal == caller)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLE: &str = "arn:aws:iam::123456789012:role/agents/research-agent";

    #[test]
    fn an_assumed_role_session_is_bound_by_its_role_whatever_the_session_and_path() {
        let bound = vec![ROLE.to_owned()];
        assert!(is_bound("arn:aws:sts::123456789012:assumed-role/research-agent/run-42", &bound));
        assert!(is_bound("arn:aws:sts::123456789012:assumed-role/research-agent/i-0abc", &bound));
        assert!(is_bound("arn:aws:iam::123456789012:role/research-agent", &bound));
    }

    #[test]
    fn another_role_account_partition_or_a_user_of_that_name_is_not_bound() {
        let bound = vec![ROLE.to_owned()];
        for caller in [
            "arn:aws:sts::123456789012:assumed-role/billing-agent/run-42",
            "arn:aws:sts::210987654321:assumed-role/research-agent/run-42",
            "arn:aws-cn:sts::123456789012:assumed-role/research-agent/run-42",
            "arn:aws:iam::123456789012:user/research-agent",
            "arn:aws:sts::123456789012:federated-user/research-agent",
            "arn:aws:sts::123456789012:assumed-role/research-agent",
            "research-agent",
            "",
        ] {
            assert!(!is_bound(caller, &bound), "{caller}");
        }
        assert!(!is_bound("arn:aws:sts::123456789012:assumed-role/research-agent/s", &[]));
        let user = vec!["arn:aws:iam::123456789012:user/ops/alice".to_owned()];
        assert!(is_bound("arn:aws:iam::123456789012:user/ops/alice", &user));
        assert!(!is_bound("arn:aws:iam::123456789012:user/alice", &user));
    }

    #[test]
    fn arns_are_checked_where_they_enter() {
        assert!(check_principal_arn(ROLE).is_ok());
        assert!(
            check_principal_arn("arn:aws:sts::123456789012:assumed-role/r/s").is_err(),
            "a session is not a principal"
        );
        assert!(check_principal_arn("arn:aws:iam::12345:role/r").is_err());
        assert!(check_principal_arn("arn:aws:iam::123456789012:role/bad name").is_err());
        assert!(check_principal_arn(&format!("arn:aws:iam::123456789012:role/{}", "r".repeat(129))).is_err());
        assert!(check_caller_arn("arn:aws:sts::123456789012:assumed-role/r/s").is_ok());
        assert!(check_caller_arn(&format!("arn:aws:sts::123456789012:assumed-role/r/{}", "s".repeat(3000))).is_err());
    }
}
