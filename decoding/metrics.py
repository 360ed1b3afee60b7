"""Per-generation statistics: a plain dataclass, filled by the engine, read by sinks."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class GenerationStats:
    method: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0         # of the prompt's, taken from the prefix cache (not run)
    new_tokens: int = 0
    steps: int = 0                 # verification forwards (the prefill is not counted)
    drafted: int = 0               # draft tokens sent to verification
    accepted: int = 0              # draft tokens accepted and committed (none past a stop)
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_commit: float = 0.0       # acceptance decision + KV compaction
    time_total: float = 0.0
    finish_reason: str = ""
    verifier: str = "strict"
    soft_gates: dict | None = None # gate counters of soft-gated verification
    dtype: str = ""                # what the target ran in

    @property
    def mat(self) -> float:
        """Mean accepted tokens: tokens committed per verification forward, bonus token included."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.time_total if self.time_total > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(mat=self.mat, acceptance_rate=self.acceptance_rate, tokens_per_s=self.tokens_per_s)
        return d

    def summary(self) -> str:
        return (f"{self.method}: {self.new_tokens} tokens in {self.steps} steps, MAT {self.mat:.2f}, "
                f"acceptance {self.acceptance_rate:.1%} ({self.accepted}/{self.drafted}), "
                f"{self.tokens_per_s:.1f} tok/s; time prefill {self.time_prefill*1e3:.0f} ms, "
                f"draft {self.time_draft*1e3:.0f} ms, verify {self.time_verify*1e3:.0f} ms, "
                f"commit {self.time_commit*1e3:.0f} ms; finish: {self.finish_reason}")
