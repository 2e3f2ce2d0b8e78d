//! The Linux calls the target relies on: unnamed files (`O_TMPFILE`) and their links,
//! `syncfs`, the umask, file times.

use std::fs::{self, File};
use std::io;
use std::os::fd::BorrowedFd;
use std::path::Path;

pub(super) fn file_time(mtime_ns: i64) -> filetime::FileTime {
    filetime::FileTime::from_unix_time(
        mtime_ns.div_euclid(1_000_000_000),
        mtime_ns.rem_euclid(1_000_000_000) as u32,
    )
}

pub(super) fn set_mtime(path: &Path, mtime_ns: i64) -> io::Result<()> {
    let t = file_time(mtime_ns);
    filetime::set_file_times(path, t, t)
}

pub(super) fn set_symlink_mtime(path: &Path, mtime_ns: i64) -> io::Result<()> {
    let t = filetime::FileTime::from_unix_time(
        mtime_ns.div_euclid(1_000_000_000),
        mtime_ns.rem_euclid(1_000_000_000) as u32,
    );
    filetime::set_symlink_file_times(path, t, t)
}

/// Gives an unnamed (`O_TMPFILE`) file the name `name` in the open directory `dir`.
/// Without CAP_DAC_READ_SEARCH the kernel refuses `AT_EMPTY_PATH`; the file's /proc
/// link works for any owner.
pub(super) fn link_unnamed_at<P: rustix::path::Arg + Copy>(
    f: &File,
    dir: BorrowedFd<'_>,
    name: P,
) -> io::Result<()> {
    use rustix::fs::{AtFlags, CWD, linkat};
    match linkat(f, "", dir, name, AtFlags::EMPTY_PATH) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::PERM) => {
            use std::os::fd::AsRawFd;
            let proc = format!("/proc/self/fd/{}", f.as_raw_fd());
            linkat(CWD, proc.as_str(), dir, name, AtFlags::SYMLINK_FOLLOW).map_err(io::Error::from)
        }
        Err(e) => Err(e.into()),
    }
}

/// Gives an unnamed (`O_TMPFILE`) file the path `dest`.
pub(super) fn link_unnamed(f: &File, dest: &Path) -> io::Result<()> {
    link_unnamed_at(f, rustix::fs::CWD, dest)
}

/// Creates an unnamed file in the open directory `dir` with `mode` (less the umask), or
/// `None` where the file system has no `O_TMPFILE` or no descriptor is left: the caller
/// stages a named file instead.
pub(super) fn create_unnamed(dir: BorrowedFd<'_>, mode: u32) -> io::Result<Option<File>> {
    use rustix::fs::{Mode, OFlags, openat};
    use rustix::io::Errno;
    match openat(
        dir,
        ".",
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode & 0o7777),
    ) {
        Ok(fd) => Ok(Some(File::from(fd))),
        Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL | Errno::MFILE | Errno::NFILE) => {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// The process's umask, read once without changing it (`None` if unknown).
pub(super) fn umask() -> Option<u32> {
    static UMASK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("Umask:"))?;
        u32::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
    })
}

/// Whether a file created with `mode` already has it (no `fchmod` needed).
pub(super) fn created_with(mode: u32) -> bool {
    mode & !0o777 == 0 && umask().is_some_and(|u| u & mode == 0)
}

pub(super) fn syncfs(root: &Path) -> io::Result<()> {
    rustix::fs::syncfs(File::open(root)?).map_err(io::Error::from)
}
