//! Writes the malformed challenges the tests know (`samples::malformed_challenges`) as seeds
//! for the fuzz targets: `cargo run -p agentpay-core --example fuzz_seeds -- fuzz/seeds`
//! (`scripts/fuzz` runs it).

use agentpay_core::samples::{ChallengeKind, malformed_challenges};

fn main() -> std::io::Result<()> {
    let root = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fuzz/seeds".into()));
    let mut written = 0;
    for (i, malformed) in malformed_challenges().into_iter().enumerate() {
        let target = match malformed.kind {
            ChallengeKind::X402V2Header => "x402_v2_header",
            ChallengeKind::X402V1Body => "x402_v1_body",
            ChallengeKind::Mpp => "mpp_challenge",
        };
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("malformed-{i}")), malformed.value)?;
        written += 1;
    }
    println!("wrote {written} malformed-challenge seeds under {}", root.display());
    Ok(())
}
