//! One round trip at a time, over the fabric or a raw baseline, recorded into a histogram.

use std::time::{Duration, Instant};

use agentfabric::{Bytes, Channel};
use hdrhistogram::Histogram;

use crate::baseline::BaselinePinger;
use crate::error::BenchResult;
use crate::pacer::Pacer;
use crate::quic::RawQuinn;
use crate::raw_frames::RawFrames;
use crate::report::{new_histogram, progress};

/// Something that performs one round trip at a time.
pub enum Pinger {
    /// An agentfabric channel whose peer echoes every message.
    Fabric(FabricPinger),
    /// A raw baseline (TCP stream or mpsc pair).
    Baseline(BaselinePinger),
    /// Raw quinn echo over one pair of streams (the QUIC baseline; boxed, it is large).
    Quinn(Box<RawQuinn>),
    /// One frame echoed over a raw transport connection, no session (the frames workload's
    /// baseline; boxed, it is large).
    Frames(Box<RawFrames>),
}

impl Pinger {
    /// One round trip.
    pub async fn round_trip(&mut self) -> BenchResult<()> {
        match self {
            Pinger::Fabric(p) => p.round_trip().await,
            Pinger::Baseline(p) => p.round_trip().await,
            Pinger::Quinn(p) => p.round_trip().await,
            Pinger::Frames(p) => p.round_trip().await,
        }
    }

    /// The fabric pinger inside, if this is one.
    pub fn as_fabric(&self) -> Option<&FabricPinger> {
        match self {
            Pinger::Fabric(p) => Some(p),
            Pinger::Baseline(_) | Pinger::Quinn(_) | Pinger::Frames(_) => None,
        }
    }

    /// Round trips back to back until `until`; each one is recorded (in nanoseconds) when
    /// `hist` is given. Returns the number of round trips made.
    pub async fn run_until(
        &mut self,
        until: Instant,
        hist: Option<&mut Histogram<u64>>,
    ) -> BenchResult<u64> {
        self.run_paced_until(until, hist, &mut Pacer::back_to_back())
            .await
    }

    /// As [`Pinger::run_until`], each round trip starting when `pacer` lets it; the wait before
    /// a round trip is not part of its time.
    pub async fn run_paced_until(
        &mut self,
        until: Instant,
        mut hist: Option<&mut Histogram<u64>>,
        pacer: &mut Pacer,
    ) -> BenchResult<u64> {
        let mut n = 0;
        loop {
            pacer.wait().await?;
            let t0 = Instant::now();
            if t0 >= until {
                return Ok(n);
            }
            self.round_trip().await?;
            let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
            if let Some(h) = hist.as_deref_mut() {
                h.saturating_record(ns.max(1));
            }
            n += 1;
        }
    }

    /// Round trips paced by `pacer` for `warmup`, not recorded, then for `dur`, recorded into
    /// `hist`; returns the recorded count.
    pub async fn warm_then_record(
        &mut self,
        warmup: Duration,
        dur: Duration,
        hist: &mut Histogram<u64>,
        pacer: &mut Pacer,
    ) -> BenchResult<u64> {
        self.run_paced_until(Instant::now() + warmup, None, pacer)
            .await?;
        self.run_paced_until(Instant::now() + dur, Some(hist), pacer)
            .await
    }
}

/// A client channel of a [`FabricPair`]: sends a payload and waits for the echo.
pub struct FabricPinger {
    channel: Channel,
    payload: Bytes,
}

impl FabricPinger {
    /// Round trips of `size`-byte messages on `channel`, whose peer echoes them.
    pub fn new(channel: Channel, size: usize) -> FabricPinger {
        FabricPinger {
            channel,
            payload: Bytes::from(vec![0xa5u8; size]),
        }
    }

    /// The channel the round trips go over.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// One round trip with plain `send` then `recv` (not `request`/`respond`).
    pub async fn round_trip(&mut self) -> BenchResult<()> {
        self.channel.send(self.payload.clone()).await?;
        let m = self.channel.recv().await?;
        if m.body.len() != self.payload.len() {
            return Err(format!(
                "echo of {} bytes came back as {} bytes",
                self.payload.len(),
                m.body.len()
            )
            .into());
        }
        Ok(())
    }
}

/// Longest measured slice before switching to the other side in [`interleave`].
const SLICE: Duration = Duration::from_millis(500);

/// Warms `a` and then `b` up for `warmup`, then measures them in alternating slices of about
/// half a second (a first, then b, then b first…) until each has been measured for `duration`,
/// so slow drifts of a shared machine hit both alike. Returns their histograms (a, b).
pub async fn interleave(
    a: &mut Pinger,
    b: &mut Pinger,
    b_name: &str,
    warmup: Duration,
    duration: Duration,
) -> BenchResult<(Histogram<u64>, Histogram<u64>)> {
    let (mut ha, mut hb) = (new_histogram(), new_histogram());
    progress(&format!("warming up fabric and {b_name}"));
    a.run_until(Instant::now() + warmup, None).await?;
    b.run_until(Instant::now() + warmup, None).await?;
    let slices = (duration.as_secs_f64() / SLICE.as_secs_f64())
        .ceil()
        .max(1.0) as u32;
    let slice = duration / slices;
    progress(&format!(
        "measuring {slices} interleaved slices of {:.3} s each",
        slice.as_secs_f64()
    ));
    for i in 0..slices {
        let (first, hfirst, second, hsecond) = match i % 2 {
            0 => (&mut *a, &mut ha, &mut *b, &mut hb),
            _ => (&mut *b, &mut hb, &mut *a, &mut ha),
        };
        first
            .run_until(Instant::now() + slice, Some(hfirst))
            .await?;
        second
            .run_until(Instant::now() + slice, Some(hsecond))
            .await?;
    }
    Ok((ha, hb))
}
