//! Host limits a load test runs into: open files (every socket is one) and loopback targets.

/// The process's open-file limits after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct NofileLimit {
    pub soft: u64,
    pub hard: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("cannot read or set RLIMIT_NOFILE: {0}")]
    Syscall(std::io::Error),
    #[error(
        "this scenario opens about {needed} sockets and files, but this process may open at most {hard} \
         (RLIMIT_NOFILE hard limit). Raise the hard limit where you start liverec-load (as root: \
         `ulimit -Hn 200000; ulimit -n 200000`, `prlimit --nofile=200000 --pid $$`, or LimitNOFILE= in a \
         systemd unit; the kernel caps it at /proc/sys/fs/nr_open) or lower ws_sockets / idle_ws_sockets / \
         sse_subscribers with --set. The server holds one descriptor per subscriber too: start it from a \
         shell with the same `ulimit -n`"
    )]
    TooLow { needed: u64, hard: u64 },
    #[error("refusing to load {0}: liverec-load only targets loopback addresses (127.0.0.0/8, localhost, [::1])")]
    NotLoopback(String),
}

/// Raises the soft open-file limit to the hard limit (an unprivileged process may) and returns
/// both.
pub fn raise_nofile() -> Result<NofileLimit, LimitError> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(LimitError::Syscall(std::io::Error::last_os_error()));
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit only reads the struct; raising the soft limit up to the hard one
        // needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(LimitError::Syscall(std::io::Error::last_os_error()));
        }
        limit = raised;
    }
    Ok(NofileLimit { soft: limit.rlim_cur, hard: limit.rlim_max })
}

/// Fails with instructions when `needed` descriptors do not fit under the limit.
pub fn ensure_nofile(needed: u64) -> Result<NofileLimit, LimitError> {
    let limit = raise_nofile()?;
    if needed > limit.soft {
        return Err(LimitError::TooLow { needed, hard: limit.hard });
    }
    Ok(limit)
}

/// Accepts only loopback targets: `http://127.x.y.z:port`, `http://localhost:port`,
/// `http://[::1]:port`, or a bare `host:port` list (Kafka brokers), every entry loopback.
pub fn check_loopback(target: &str) -> Result<(), LimitError> {
    for entry in target.split(',') {
        let rest = entry.trim();
        let rest = rest.split_once("://").map_or(rest, |(_, r)| r);
        let authority = rest.split('/').next().unwrap_or("");
        let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
        let host = if let Some(v6) = authority.strip_prefix('[') {
            v6.split(']').next().unwrap_or("")
        } else {
            authority.split(':').next().unwrap_or("")
        };
        let loopback =
            host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Err(LimitError::NotLoopback(entry.trim().to_owned()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback() {
        for ok in ["http://127.0.0.1:8080", "http://localhost:1/x", "http://[::1]:80", "127.0.0.1:9092,localhost:9093"]
        {
            assert!(check_loopback(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:8080",
            "http://example.com",
            "http://127.0.0.1.example.com:80",
            "http://[::2]:80",
            "127.0.0.1:9092,192.168.1.1:9092",
            "http://user@10.0.0.1",
        ] {
            assert!(check_loopback(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn raising_keeps_soft_at_most_hard() {
        let limit = raise_nofile().expect("getrlimit works");
        assert!(limit.soft <= limit.hard);
        assert!(ensure_nofile(u64::MAX).is_err());
    }
}
