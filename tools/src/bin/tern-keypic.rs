//! Renders a secret-chat fingerprint the way `tern` shows it: the key
//! picture (terminal, PNG, SVG), the emoji line or hex.
//!
//! ```text
//! tern-keypic 5f3a…(64 hex digits) --format png --out key.png
//! ```

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use tern_protocol::secret::{Fingerprint, KeyPicture};

#[derive(Parser)]
#[command(about = "Render a Tern secret-chat fingerprint")]
struct Args {
    /// The fingerprint: 64 hex digits (spaces allowed).
    fingerprint: String,
    #[arg(long, value_enum, default_value = "picture")]
    format: Format,
    /// Write to this file instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Pixels per cell, for PNG.
    #[arg(long, default_value_t = 20)]
    scale: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Picture,
    Emoji,
    Hex,
    Png,
    Svg,
}

fn parse(hex: &str) -> anyhow::Result<Fingerprint> {
    let digits: String = hex.chars().filter(|c| !c.is_whitespace()).collect();
    if digits.len() != 64 {
        bail!("a fingerprint is 64 hex digits; got {}", digits.len());
    }
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).context("not hex")?;
    }
    Ok(Fingerprint::from_bytes(bytes))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let f = parse(&args.fingerprint)?;
    let pic = KeyPicture::new(&f);
    let bytes = match args.format {
        Format::Picture => pic.terminal().into_bytes(),
        Format::Emoji => format!("{}\n", f.emoji_line()).into_bytes(),
        Format::Hex => format!("{}\n", f.hex()).into_bytes(),
        Format::Png => pic.png(args.scale),
        Format::Svg => pic.svg().into_bytes(),
    };
    match args.out {
        Some(path) => std::fs::write(&path, bytes)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => {
            use std::io::Write;
            std::io::stdout().write_all(&bytes)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_hex_prints_and_rejects_the_rest() {
        let f = Fingerprint::from_handshake_hash(b"x");
        assert_eq!(parse(&f.hex()).unwrap(), f);
        assert!(parse("abc").is_err());
        assert!(parse(&"zz".repeat(32)).is_err());
    }
}
