//! A private ext4 file system for the benchmark's files: a sparse image in the scratch
//! directory, attached to a loop device with direct I/O (no second page cache for the image)
//! and mounted beneath the scratch directory. No other process creates or removes files in it,
//! and removing the benchmark's millions of files at the end is one unmount.
//!
//! Owns the image, the loop device and the mount; it never touches any other mount or device.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Unmount attempts before a lazy unmount (a process that was just killed may still hold a
/// file open for a moment).
const UMOUNT_TRIES: u32 = 20;
/// mkfs.ext4's bytes-per-inode ratio: one inode per 4 KiB block.
const BYTES_PER_INODE: u64 = 4096;
/// Pause between two unmount attempts.
const UMOUNT_PAUSE: Duration = Duration::from_millis(250);

/// A mounted image; dropping it unmounts it, detaches the loop device and removes the image.
#[derive(Debug)]
pub struct LoopFs {
    image: PathBuf,
    device: Option<String>,
    mount: PathBuf,
    mounted: bool,
    /// What the report says about it.
    pub description: String,
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl LoopFs {
    /// Whether this machine can do it: root, and the loop and mkfs tools are there.
    pub fn available() -> bool {
        nix::unistd::geteuid().is_root()
            && Path::new("/dev/loop-control").exists()
            && ["losetup", "mkfs.ext4", "mount", "umount"]
                .iter()
                .all(|t| crate::harness::find_in_path(t).is_some())
    }

    /// Creates a `size`-byte ext4 image in `dir` and mounts it at `dir/fs`.
    pub fn create(dir: &Path, size: u64) -> Result<LoopFs> {
        let image = dir.join("fs.img");
        let mount = dir.join("fs");
        fs::create_dir_all(&mount)?;
        fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .with_context(|| format!("creating the image {}", image.display()))?;
        let mut me = LoopFs {
            image,
            device: None,
            mount,
            mounted: false,
            description: String::new(),
        };
        let img = me.image.display().to_string();
        // Inode tables and journal are written now, not by a background thread during the
        // measurements; one inode per block, because the benchmark keeps millions of 4 KiB
        // files.
        let ratio = BYTES_PER_INODE.to_string();
        run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-i",
                &ratio,
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                &img,
            ],
        )?;
        let device = run("losetup", &["--find", "--show", "--direct-io=on", &img])?;
        me.device = Some(device.clone());
        run("mount", &[&device, &me.mount.display().to_string()])?;
        me.mounted = true;
        me.description = format!(
            "a fresh ext4 ({} GiB sparse image on the host's {}, {device} with direct I/O, \
             mkfs.ext4 -i {BYTES_PER_INODE}, otherwise defaults)",
            size >> 30,
            crate::filesystem_of(dir)
        );
        Ok(me)
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mount
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            let target = self.mount.display().to_string();
            let mut done = false;
            for _ in 0..UMOUNT_TRIES {
                if run("umount", &[&target]).is_ok() {
                    done = true;
                    break;
                }
                std::thread::sleep(UMOUNT_PAUSE);
            }
            if !done {
                eprintln!("repl-bench: {target} is busy; unmounting it lazily");
                let _ = run("umount", &["-l", &target]);
            }
        }
        if let Some(dev) = &self.device {
            let _ = run("losetup", &["-d", dev]);
        }
        let _ = fs::remove_file(&self.image);
    }
}
