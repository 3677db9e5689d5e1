//! A merchant's settlement answer (x402 v2 `PAYMENT-RESPONSE`, v1 `X-PAYMENT-RESPONSE`, MPP
//! `Payment-Receipt`; the first byte picks which), parsed and checked against a payment.
#![no_main]

use agentpay_core::money::AtomicAmount;
use agentpay_core::payment::Network;
use agentpay_core::settlement::{AuthorizedPayment, ReportInput, ReportedOutcome, SettlementReport, mismatch};
use agentpay_fuzz::*;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fuzz_target!(|data: &[u8]| {
    let Some((kind, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let input = match kind % 3 {
        0 => ReportInput::X402V2(text.to_owned()),
        1 => ReportInput::X402V1(text.to_owned()),
        _ => ReportInput::MppReceipt(text.to_owned()),
    };
    match within_memory_bound(data.len(), || input.parse()) {
        Err(error) => assert_names_fields(&error, "paymentResponse", &[]),
        Ok(report) => {
            // A settled report always names its transaction; a failed one never does.
            match report.outcome {
                ReportedOutcome::Settled => assert!(report.transaction.is_some(), "{report:?}"),
                ReportedOutcome::Failed => assert!(report.transaction.is_none(), "{report:?}"),
                ReportedOutcome::Pending => {}
            }
            if let Some(tx) = &report.transaction {
                assert!(tx.len() == 66 && tx.starts_with("0x") && tx[2..].bytes().all(|b| b.is_ascii_hexdigit()));
            }
            // What is kept survives the ledger's serialisation unchanged.
            let json = serde_json::to_value(&report).expect("a report serialises");
            let back: SettlementReport = serde_json::from_value(json.clone()).expect("and deserialises");
            assert_eq!(back, report, "{json}");
            // Checking it against a payment never panics, and the same report never
            // contradicts a payment built from itself.
            let paid = AuthorizedPayment {
                network: report.network.unwrap_or(Network::BaseSepolia),
                payer: report.payer.as_deref().map(|p| p.parse().expect("a kept payer is an address")),
                amount: report.amount.unwrap_or(AtomicAmount::new(1).unwrap()),
            };
            assert_eq!(mismatch(&report, &paid), None);
        }
    }
});
