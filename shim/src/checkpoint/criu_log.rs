//! What CRIU's logs say: the first meaningful error line, the version.

use std::{fs, path::Path};

use crate::error::Error;

/// CRIU's error, with its first meaningful log line and a copy of the log
/// kept in the bundle (the work dir may be gone by the time anyone looks).
/// A runc that ran past its time stays DeadlineExceeded, with the log named.
pub(super) fn criu_failure(
    action: &'static str,
    e: Error,
    work: &Path,
    log_name: &str,
    bundle: &Path,
) -> Error {
    let log = work.join(log_name);
    let kept = bundle.join(format!("criu-{log_name}"));
    if fs::copy(&log, &kept).is_err() {
        return e;
    }
    if let Error::DeadlineExceeded(m) = e {
        let last = fs::read_to_string(&kept)
            .ok()
            .and_then(|t| {
                t.lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        return Error::DeadlineExceeded(format!(
            "{m}; CRIU's log is kept at {} (its last line: {})",
            kept.display(),
            last.trim()
        ));
    }
    let message = first_criu_error(&kept).unwrap_or_else(|| e.to_string());
    // runc names the log in the work dir: name the kept copy instead.
    let runc_said = e
        .to_string()
        .replace(&log.display().to_string(), &kept.display().to_string());
    Error::Criu {
        action,
        message: format!("{message} ({runc_said})"),
        log: kept,
    }
}

/// The first line of a CRIU log that says what went wrong. CRIU also logs
/// errors it shrugs off (an rlimit it cannot raise) and echoes of a helper's
/// exit status: those say nothing about the failure.
pub(super) fn first_criu_error(log: &Path) -> Option<String> {
    let text = fs::read_to_string(log).ok()?;
    criu_error_line(&text)
}

pub(super) fn criu_error_line(text: &str) -> Option<String> {
    // CRIU's own errors read "Error (file.c:line): ..."; a file name with "error" in it
    // (libgpg-error.so) is not one.
    let line = text
        .lines()
        .filter(|l| l.contains("Error ("))
        // Harmless: CRIU raising its own fd limit without CAP_SYS_RESOURCE.
        .filter(|l| !l.contains("Can't setup RLIMIT_NOFILE for self"))
        .find(|l| !l.contains("exited, status="))?;
    // Drop CRIU's "(00.012345) " timestamp prefix and the pid column of a restore's log.
    let line = match line.split_once("Error (") {
        Some((_, rest)) => format!("Error ({rest}"),
        None => line.trim().to_string(),
    };
    if line.contains("Can't get rlimit") && line.contains("Operation not permitted") {
        // prlimit(2) on a process of another user needs CAP_SYS_RESOURCE.
        return Some(format!(
            "{line} (CRIU cannot read the limits of a process running as another user without CAP_SYS_RESOURCE, which this host does not grant)"
        ));
    }
    Some(line)
}

pub(super) fn criu_version(log: &Path) -> Option<String> {
    let text = fs::read_to_string(log).ok()?;
    text.lines()
        .find_map(|l| l.split_once("Version: ").map(|(_, v)| v.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meaningful_criu_line_is_picked() {
        let log = "(00.028567) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.03) Error (criu/util.c:656): exited, status=1
Error (criu/util.c:641): execvp(\"iptables-restore\", ...) failed: No such file or directory
(00.034472) Error (criu/cr-dump.c:2111): Dumping FAILED.";
        assert_eq!(
            criu_error_line(log).as_deref(),
            Some("Error (criu/util.c:641): execvp(\"iptables-restore\", ...) failed: No such file or directory")
        );
        let log = "(00.048920) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.131422) Handling VMA with the following smaps entry: 7f5067e3a000-7f5067e3f000 r--p 00000000 00:30 10035910 /usr/lib/x86_64-linux-gnu/libgpg-error.so.0.33.1
(00.145821) Error (criu/cr-dump.c:389): Can't get rlimit 0: Operation not permitted
(00.236479) Error (criu/cr-dump.c:1975): Dumping FAILED.";
        let line = criu_error_line(log).unwrap();
        assert!(
            line.starts_with("Error (criu/cr-dump.c:389): Can't get rlimit 0: Operation not permitted (CRIU cannot read"),
            "{line}"
        );
        let restore = "(00.171172)     10: Error (soccr/soccr.c:529): Can't connect inet socket back: Network is unreachable";
        assert_eq!(
            criu_error_line(restore).as_deref(),
            Some(
                "Error (soccr/soccr.c:529): Can't connect inet socket back: Network is unreachable"
            )
        );
        assert_eq!(
            criu_error_line("(00.1) Error (criu/sk-unix.c:1): unix: Can't dump external socket")
                .as_deref(),
            Some("Error (criu/sk-unix.c:1): unix: Can't dump external socket")
        );
    }
}
