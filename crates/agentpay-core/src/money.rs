//! Money as integers: atomic units of an asset, and USD limits with micro-dollar precision.
//!
//! Amounts travel as decimal strings in JSON (as x402 does) so no JavaScript or float
//! parser on the way can round them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An amount in an asset's smallest unit (USDC: 6 decimals, so 1 USDC = 1_000_000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct AtomicAmount(u64);

/// Why a string is not an amount, phrased for "expected …" messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("a non-empty decimal string of atomic units")]
    Empty,
    #[error("a whole number of atomic units without sign, decimal point or exponent")]
    NotAnInteger,
    #[error("an amount greater than zero")]
    Zero,
    #[error("an amount of at most {} atomic units", AtomicAmount::MAX.0)]
    TooLarge,
    #[error("at most {0} decimal places")]
    TooPrecise(u32),
}

impl AtomicAmount {
    /// The ledger keeps amounts in signed 64-bit columns (SQLite INTEGER), so that is the ceiling:
    /// 9.2 trillion USDC, far above any agent payment.
    pub const MAX: AtomicAmount = AtomicAmount(i64::MAX as u64);
    pub const ZERO: AtomicAmount = AtomicAmount(0);

    pub const fn new(value: u64) -> Option<Self> {
        if value <= Self::MAX.0 { Some(Self(value)) } else { None }
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    /// Lossless: MAX fits i64 by construction.
    pub fn to_i64(self) -> i64 {
        self.0 as i64
    }

    pub fn from_i64(value: i64) -> Option<Self> {
        u64::try_from(value).ok().and_then(Self::new)
    }

    pub fn checked_add(self, other: Self) -> Option<Self> {
        self.0.checked_add(other.0).and_then(Self::new)
    }

    pub fn saturating_sub(self, other: Self) -> Self {
        Self(self.0.saturating_sub(other.0))
    }

    /// Parses a positive amount as x402 sends it: digits only.
    pub fn parse_positive(text: &str) -> Result<Self, AmountError> {
        let amount: Self = text.parse()?;
        if amount.0 == 0 { Err(AmountError::Zero) } else { Ok(amount) }
    }

    /// Human form with the asset's decimals, e.g. `10000` with 6 decimals is `0.01`.
    pub fn display_with_decimals(self, decimals: u32) -> String {
        format_scaled(self.0, decimals)
    }
}

impl FromStr for AtomicAmount {
    type Err = AmountError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() {
            return Err(AmountError::Empty);
        }
        if !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AmountError::NotAnInteger);
        }
        let value: u64 = text.parse().map_err(|_| AmountError::TooLarge)?;
        Self::new(value).ok_or(AmountError::TooLarge)
    }
}

impl fmt::Display for AtomicAmount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for AtomicAmount {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for AtomicAmount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(|e: AmountError| serde::de::Error::custom(format!("expected {e}, received {text:?}")))
    }
}

/// A USD amount with micro-dollar precision (6 decimals), as policy limits are configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct UsdAmount {
    micros: u64,
}

impl UsdAmount {
    const DECIMALS: u32 = 6;

    pub const fn from_micros(micros: u64) -> Self {
        Self { micros }
    }

    pub const fn micros(self) -> u64 {
        self.micros
    }

    /// Converts to atomic units of a USD stablecoin with `decimals` decimals, exactly or not at all.
    pub fn to_atomic(self, decimals: u32) -> Option<AtomicAmount> {
        let value = if decimals >= Self::DECIMALS {
            self.micros.checked_mul(10u64.checked_pow(decimals - Self::DECIMALS)?)?
        } else {
            let divisor = 10u64.pow(Self::DECIMALS - decimals);
            if !self.micros.is_multiple_of(divisor) {
                return None;
            }
            self.micros / divisor
        };
        AtomicAmount::new(value)
    }
}

impl FromStr for UsdAmount {
    type Err = AmountError;

    /// Accepts `5`, `5.0`, `0.000001`; rejects signs, exponents and sub-micro precision.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim().trim_start_matches('$');
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        if whole.is_empty() && fraction.is_empty() {
            return Err(AmountError::Empty);
        }
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || !digits(fraction) || (text.contains('.') && fraction.is_empty()) {
            return Err(AmountError::NotAnInteger);
        }
        if fraction.len() > Self::DECIMALS as usize {
            return Err(AmountError::TooPrecise(Self::DECIMALS));
        }
        let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| AmountError::TooLarge)? };
        let padded = format!("{fraction:0<6}");
        let fraction: u64 = padded.parse().map_err(|_| AmountError::NotAnInteger)?;
        let micros = whole
            .checked_mul(1_000_000)
            .and_then(|w| w.checked_add(fraction))
            .filter(|m| *m <= AtomicAmount::MAX.get())
            .ok_or(AmountError::TooLarge)?;
        Ok(Self { micros })
    }
}

impl fmt::Display for UsdAmount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", format_scaled(self.micros, Self::DECIMALS))
    }
}

impl Serialize for UsdAmount {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for UsdAmount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(|e: AmountError| {
            serde::de::Error::custom(format!("expected a USD amount like \"5.00\" with {e}, received {text:?}"))
        })
    }
}

/// `value / 10^decimals` as a decimal string with at least two fraction digits.
fn format_scaled(value: u64, decimals: u32) -> String {
    if decimals == 0 {
        return value.to_string();
    }
    let scale = 10u64.pow(decimals);
    let fraction = format!("{:0width$}", value % scale, width = decimals as usize);
    let trimmed = fraction.trim_end_matches('0');
    let shown = if trimmed.len() < 2 { &fraction[..2] } else { trimmed };
    format!("{}.{}", value / scale, shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_amount_parsing_is_strict() {
        assert_eq!(AtomicAmount::parse_positive("10000"), Ok(AtomicAmount(10000)));
        assert_eq!(AtomicAmount::parse_positive("0"), Err(AmountError::Zero));
        assert_eq!(AtomicAmount::parse_positive("-1"), Err(AmountError::NotAnInteger));
        assert_eq!(AtomicAmount::parse_positive("1.5"), Err(AmountError::NotAnInteger));
        assert_eq!(AtomicAmount::parse_positive("1e6"), Err(AmountError::NotAnInteger));
        assert_eq!(AtomicAmount::parse_positive("+1"), Err(AmountError::NotAnInteger));
        assert_eq!(AtomicAmount::parse_positive(""), Err(AmountError::Empty));
        assert_eq!(AtomicAmount::parse_positive("9223372036854775808"), Err(AmountError::TooLarge));
        assert_eq!(AtomicAmount::parse_positive("99999999999999999999999"), Err(AmountError::TooLarge));
        assert_eq!(AtomicAmount::parse_positive("9223372036854775807"), Ok(AtomicAmount::MAX));
    }

    #[test]
    fn atomic_amount_serializes_as_string() {
        let json = serde_json::to_string(&AtomicAmount(42)).unwrap();
        assert_eq!(json, "\"42\"");
        let back: AtomicAmount = serde_json::from_str(&json).unwrap();
        assert_eq!(back, AtomicAmount(42));
        assert!(serde_json::from_str::<AtomicAmount>("\"4.2\"").is_err());
    }

    #[test]
    fn usd_limits_convert_exactly() {
        let five: UsdAmount = "5.00".parse().unwrap();
        assert_eq!(five.to_atomic(6), Some(AtomicAmount(5_000_000)));
        assert_eq!(five.to_atomic(18), Some(AtomicAmount(5_000_000_000_000_000_000)));
        // 10 USD at 18 decimals is past the ledger ceiling: refused, not wrapped.
        assert_eq!("10".parse::<UsdAmount>().unwrap().to_atomic(18), None);
        assert_eq!("0.000001".parse::<UsdAmount>().unwrap().to_atomic(6), Some(AtomicAmount(1)));
        // One micro-dollar cannot be expressed with 2 decimals: refuse rather than round.
        assert_eq!("0.000001".parse::<UsdAmount>().unwrap().to_atomic(2), None);
        assert_eq!("1.25".parse::<UsdAmount>().unwrap().to_atomic(2), Some(AtomicAmount(125)));
        assert_eq!("0.0000001".parse::<UsdAmount>(), Err(AmountError::TooPrecise(6)));
        assert_eq!("-1".parse::<UsdAmount>(), Err(AmountError::NotAnInteger));
        assert_eq!("1.".parse::<UsdAmount>(), Err(AmountError::NotAnInteger));
        assert_eq!(".5".parse::<UsdAmount>().unwrap().micros(), 500_000);
    }

    #[test]
    fn display_uses_decimals() {
        assert_eq!(AtomicAmount(10_000).display_with_decimals(6), "0.01");
        assert_eq!(AtomicAmount(1_234_567).display_with_decimals(6), "1.234567");
        assert_eq!(AtomicAmount(5_000_000).display_with_decimals(6), "5.00");
        assert_eq!("2.5".parse::<UsdAmount>().unwrap().to_string(), "2.50");
    }
}
