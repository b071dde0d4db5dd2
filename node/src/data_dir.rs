//! The data directory: where a node keeps its keys, config, store and the
//! control-API handshake files. Every path the node touches is named here.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `--data-dir`, else `$TERN_DATA_DIR` (handled by clap), else the
    /// platform data directory (`$XDG_DATA_HOME/tern` or `~/.local/share/tern`).
    pub fn default_root() -> PathBuf {
        if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(xdg).join("tern");
        }
        match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => PathBuf::from(home).join(".local/share/tern"),
            None => PathBuf::from(".tern"),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn account_key(&self) -> PathBuf {
        self.root.join("account.key")
    }
    pub fn device_key(&self) -> PathBuf {
        self.root.join("device.key")
    }
    pub fn device_cert(&self) -> PathBuf {
        self.root.join("device.cert")
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    pub fn api_token(&self) -> PathBuf {
        self.root.join("api.token")
    }
    /// Written by a running node: where its control API listens.
    pub fn api_endpoint(&self) -> PathBuf {
        self.root.join("api.json")
    }
    /// Cloud chats this node keeps as a storage peer.
    pub fn replicas(&self) -> PathBuf {
        self.root.join("replicas")
    }

    /// Data that must really disappear when deleted (secret chats).
    pub fn erasable(&self) -> PathBuf {
        self.root.join("erasable")
    }

    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }

    pub fn is_initialized(&self) -> bool {
        self.account_key().exists() || self.device_key().exists()
    }

    /// Every file `tern init` creates, for cleaning up after a failed init.
    pub fn init_files(&self) -> [PathBuf; 5] {
        [
            self.account_key(),
            self.device_key(),
            self.device_cert(),
            self.api_token(),
            self.config(),
        ]
    }
}

/// Writes `contents` to `path` atomically (temporary file, fsync, rename), with
/// mode 0600 when `private`. Readers never see a half-written file, and a
/// crash leaves either the old file or the new one.
pub fn write_atomic(path: &Path, contents: &[u8], private: bool) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", file_name.to_string_lossy()));
    {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(if private { 0o600 } else { 0o644 });
        }
        let mut f = opts.open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Ok(d) = fs::File::open(dir) {
        // Make the rename itself durable; not all platforms allow this.
        let _ = d.sync_all();
    }
    Ok(())
}

/// Creates `path` (which must not exist) with mode 0600 and writes `contents`.
pub fn create_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

/// Reads a file the node wrote itself, refusing anything larger than `max`
/// bytes so a damaged or hostile file cannot exhaust memory.
pub fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    // Read at most max + 1 bytes rather than trusting the reported size,
    // which is 0 for pipes such as /dev/stdin.
    let mut buf = Vec::new();
    io::Read::read_to_end(
        &mut io::Read::take(fs::File::open(path)?, max + 1),
        &mut buf,
    )?;
    if buf.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is larger than the {max} bytes expected", path.display()),
        ));
    }
    Ok(buf)
}

/// Creates `dir` (and parents) readable by the owner only: it holds keys and,
/// later, chat data.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}
