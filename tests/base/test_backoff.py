import random

from agent.base.backoff import Backoff


def test_full_jitter_grows_to_the_cap_and_stays_within_it():
    b = Backoff(base_s=1.0, cap_s=30.0, uniform01=random.Random(7).random)
    ceilings, delays = [], []
    for _ in range(12):
        ceilings.append(b.ceiling())
        delays.append(b.next_delay())
    assert ceilings[:6] == [1, 2, 4, 8, 16, 30]
    assert all(c == 30 for c in ceilings[5:])
    assert all(0.05 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(round(d, 6) for d in delays)) == len(delays)  # jittered, not lock-step
    b.reset()
    assert b.ceiling() == 1.0


def test_never_zero_delay():
    b = Backoff(base_s=0.001, cap_s=0.001)
    assert min(b.next_delay() for _ in range(100)) >= 0.05


def test_fleet_spread():
    """Many devices at the same attempt pick well spread delays (the point of full jitter)."""
    delays = sorted(Backoff(1.0, 60.0, attempt=5).next_delay() for _ in range(1000))
    assert delays[100] < 8 and delays[900] > 24
