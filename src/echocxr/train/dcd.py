"""Stage 3: DCD (Direct Conditional Distillation), ECHO Sec. 3.3 ("Stage 3"), and its ablations.

A one-step decoder predicts every position of a block independently from one forward (mean-field),
which degrades text. DCD distils the multi-step teacher's confidence-ordered trajectory into it:

Phase 1 (trajectories). The teacher (a RAD checkpoint) decodes distillation studies block by block
with the block decoder's loop (`model.denoise.denoise_blocks`, confidence-ordered unmasking,
recording the trajectory). For every response
position we keep the token it committed, the step s (0..K-1) at which it was committed, and the
teacher's distribution at that step as top-k probabilities plus the residual mass r outside them.
Rollouts that fall into a repetition loop are discarded (`repetition_loop`).

Phase 2 (alignment). The student sees, in the RAD layout [prefix | all-mask blocks | clean teacher
tokens], every block fully masked and conditioned on the teacher's committed blocks before it, so all
blocks of a rollout train in one forward. Per position j with teacher target p_j (top-k + rest):

    L = sum_j w_j KL(p_j || q_j) / sum_j w_j  +  lambda_eos * mean_rollouts -log q_end(EOS)
    w_j = 1 + alpha * s_j / (S_b - 1)    (later commits carry more mean-field bias)

s_j is the step of its block at which position j was committed and S_b the number of steps that
block actually took (a dynamic teacher often finishes a block before K), so the last commit of
every block weighs 1 + alpha. "end" is the rollout's first EOS: the one place the EOS term
supervises. Positions after it carry no target at all (the one-step decoder cuts a block at its
first EOS, so nothing it predicts there is ever read; the teacher's distribution there, often
content committed after its own EOS, would pull against the EOS-padded context).

KL over k + 1 buckets: the teacher's top-k tokens and one "rest" bucket (the student's mass outside
the teacher's top-k). That coarsening can only lower the KL (data-processing inequality); docs/DCD.md
gives the measured gap for k = 8, 32, 64.

Rounds: each round draws a fresh distillation set (seeded by the round) and decodes it with the
teacher or the current student (`refresh`).

Ablations: `kl="reverse"` (KL(q || p) on the same buckets), `alpha=0` (w_j = 1), `eos_weight=0`,
`objective="onestep-ft"` (cross-entropy of the one-step student on ground-truth reports, no
teacher).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from echocxr.model import denoise
from echocxr.model.denoise import StepRecord
from echocxr.model.layout import AR_SHIFT, checkpoint_fields, rad_student_logits
from echocxr.model.vlm import EchoVLM
from echocxr.train.loop import is_sharded

OBJECTIVES = ("dcd", "onestep-ft")
KL_DIRECTIONS = ("forward", "reverse")
REFRESH = ("teacher", "student")
# How the teacher writes its trajectories. "block": the paper's, the RAD teacher's multi-step block
# decoder (`strategy`, `threshold`, `teacher_steps`). "ar": an AR checkpoint (`--teacher`, e.g. the
# Stage 1 model) decoding token by token; within each block of B positions the step of position
# j is its offset j mod B (left-to-right order) and p_j is the AR model's next-token distribution.
TEACHER_DECODERS = ("block", "ar")
NO_TARGET = -1  # step value of a position without a teacher distribution (EOS padding past the rollout)


# -- targets -------------------------------------------------------------------------------------


@dataclass
class Targets:
    """Teacher targets for a batch of rollouts, aligned with the response [B, R]."""

    tokens: torch.Tensor  # [B, R] teacher's committed tokens (EOS-padded to whole blocks)
    step: torch.Tensor  # [B, R] long, unmask step 0..S_b-1 within the block; NO_TARGET where none
    top_idx: torch.Tensor  # [B, R, k] long
    top_p: torch.Tensor  # [B, R, k] teacher probabilities of those tokens
    rest: torch.Tensor  # [B, R] teacher mass outside its top-k
    block_steps: torch.Tensor  # [B, R] long: S_b, the steps the position's block took (0 where none)
    end: torch.Tensor  # [B, R] bool: the rollout's first EOS (the EOS term's one position per row)


def topk_target(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full distributions [..., V] -> (top-k indices, their probabilities, residual mass)."""
    V = probs.shape[-1]
    p, idx = probs.float().topk(min(k, V), dim=-1)
    rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    return idx, p, rest if k < V else torch.zeros_like(rest)  # k >= V: the rest is rounding error


# -- the loss (paper: Stage 3, Phase 2) -------------------------------------------------------------


def bucket_log_probs(logits: torch.Tensor, top_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Student logits [N, V] -> (log q on the teacher's top-k [N, k], log q of the rest bucket [N])."""
    logits = logits.float()
    log_z = logits.logsumexp(-1)
    log_top = logits.gather(-1, top_idx) - log_z[:, None]
    # exact log of the mass outside the top-k, without 1 - sum(q) cancellation; a huge negative
    # fill rather than -inf keeps the gradient finite when the top-k covers the whole vocabulary
    log_rest = logits.scatter(-1, top_idx, -1e30).logsumexp(-1) - log_z
    return log_top, log_rest


def kl_topk(
    logits: torch.Tensor,
    top_idx: torch.Tensor,
    top_p: torch.Tensor,
    rest: torch.Tensor,
    direction: str = "forward",
    floor: float = 1e-30,
) -> torch.Tensor:
    """KL between the teacher's (top-k + rest) distribution p and the student's q on the same k + 1
    buckets, per position [N]. forward: KL(p || q); reverse: KL(q || p), where teacher
    probabilities are floored at `floor` (a rest that is exactly 0 would make it infinite)."""
    log_q, log_q_rest = bucket_log_probs(logits, top_idx)
    p = torch.cat([top_p.float(), rest.float()[:, None]], -1)  # [N, k + 1]
    log_q = torch.cat([log_q, log_q_rest[:, None]], -1)
    if direction == "forward":
        return torch.where(p > 0, p * (p.clamp_min(floor).log() - log_q), 0.0).sum(-1)
    if direction == "reverse":
        q = log_q.exp()
        return (q * (log_q - p.clamp_min(floor).log())).sum(-1)
    raise ValueError(f"unknown KL direction {direction!r}")


def step_weights(step: torch.Tensor, block_steps: torch.Tensor, alpha: float) -> torch.Tensor:
    """w = 1 + alpha * s / (S_b - 1) per position (step, block_steps: same-shape long tensors):
    the last commit of each block weighs 1 + alpha and its first 1, whether the block took the
    teacher's nominal K steps or fewer; a block finished in one step weighs 1 throughout."""
    span = (block_steps - 1).clamp_min(1).float()
    w = 1.0 + alpha * step.clamp_min(0).float() / span
    return torch.where(block_steps > 1, w, torch.ones_like(w))


def dcd_loss(
    logits: torch.Tensor,
    targets: Targets,
    eos: int,
    *,
    kl: str = "forward",
    alpha: float = 1.0,
    eos_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Student block-position logits [B, R, V] against teacher targets (module docstring)."""
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    step = targets.step.reshape(-1)
    has = step != NO_TARGET
    k = targets.top_idx.shape[-1]
    div = kl_topk(
        flat[has],
        targets.top_idx.reshape(-1, k)[has],
        targets.top_p.reshape(-1, k)[has],
        targets.rest.reshape(-1)[has],
        kl,
    )
    w = step_weights(step[has], targets.block_steps.reshape(-1)[has], alpha)
    loss_kl = (w * div).sum() / w.sum().clamp_min(1e-8)
    end = targets.end.reshape(-1)
    loss_eos = -flat[end].float().log_softmax(-1)[:, eos].mean() if bool(end.any()) else flat.sum() * 0
    loss = loss_kl + eos_weight * loss_eos
    logs = {
        "kl": loss_kl.item(),
        "eos_ce": loss_eos.item(),
        "kl_unweighted": div.mean().item() if has.any() else 0.0,
    }
    return loss, logs


def topk_kl_gap(teacher_logits: torch.Tensor, student_logits: torch.Tensor, ks=(8, 32, 64)) -> dict:
    """How much of KL(teacher || student) the top-k + rest objective sees, for each k: mean full
    KL, mean top-k KL, the teacher mass inside its top-k ([N, V] logits each; docs/DCD.md)."""
    t, s = teacher_logits.float(), student_logits.float()
    full = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    out = {"full_kl": full.mean().item()}
    for k in ks:
        idx, p, rest = topk_target(t.softmax(-1), k)
        out[f"top{k}_kl"] = kl_topk(s, idx, p, rest).mean().item()
        out[f"top{k}_mass"] = p.sum(-1).mean().item()
    return out


# -- the student in the RAD layout: `model.layout.rad_student_logits` (one forward, every block
# fully masked given the clean blocks before it; also used by the evaluation) ------------------


# -- repetition loops (Phase 1 filter) -----------------------------------------------------------------


def repetition_loop(tokens: list[int], max_n: int = 8, min_repeats: int = 3, min_span: int = 12) -> bool:
    """True if some n-gram (n <= max_n) repeats back to back at least `min_repeats` times over at
    least `min_span` tokens, e.g. "no effusion. no effusion. no effusion." A short stutter such as
    a doubled word does not count."""
    T = len(tokens)
    for n in range(1, max_n + 1):
        need = max(min_repeats, -(-min_span // n))  # repeats of the n-gram to flag
        run = 0  # tokens so far that equal the token n positions earlier
        for i in range(n, T):
            run = run + 1 if tokens[i] == tokens[i - n] else 0
            if run >= (need - 1) * n:
                return True
    return False


# -- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DCDConfig:
    block_size: int = denoise.BLOCK_SIZE
    objective: str = "dcd"  # "dcd" | "onestep-ft" (ablation: one-step CE on ground truth, no teacher)
    kl: str = "forward"  # "forward" (paper) | "reverse" (ablation)
    alpha: float = 1.0  # step weight slope; 0 = --no-step-weight
    eos_weight: float = 1.0  # lambda_eos; 0 = --no-eos-loss
    top_k: int = denoise.RECORD_TOP_K  # teacher probabilities kept per position (+ the rest mass)
    teacher_steps: int | None = None  # K denoising steps per block for the teacher (None: block size)
    strategy: str = denoise.STRATEGY
    threshold: float = denoise.THRESHOLD
    max_new_tokens: int | None = None  # longest teacher rollout; None: the teacher's max_response_tokens
    rounds: int = 1
    refresh: str = "teacher"  # who decodes the trajectories of rounds after the first
    teacher_decoder: str = "block"  # TEACHER_DECODERS
    distill_studies: int = 256
    collect_batch: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        from echocxr.errors import UserError

        if self.objective not in OBJECTIVES:
            raise UserError(f"--objective must be one of {OBJECTIVES}, not {self.objective!r}")
        if self.kl not in KL_DIRECTIONS:
            raise UserError(f"--kl must be one of {KL_DIRECTIONS}, not {self.kl!r}")
        if self.strategy not in denoise.STRATEGIES:
            raise UserError(f"--strategy must be one of {denoise.STRATEGIES}, not {self.strategy!r}")
        if self.teacher_decoder not in TEACHER_DECODERS:
            raise UserError(
                f"--teacher-decoder must be one of {TEACHER_DECODERS}, not {self.teacher_decoder!r}"
            )
        if self.teacher_decoder == "ar" and self.refresh != "teacher":
            raise UserError(
                "--teacher-decoder ar decodes every round with the AR teacher: use --refresh teacher"
            )
        if self.refresh not in REFRESH:
            raise UserError(f"--refresh must be one of {REFRESH}, not {self.refresh!r}")
        if self.block_size < 1 or self.top_k < 1 or self.rounds < 1 or self.distill_studies < 1:
            raise UserError("--block-size, --top-k, --rounds and --distill-studies must be >= 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.teacher_steps is not None and not 1 <= self.teacher_steps <= self.block_size:
            raise UserError(f"--teacher-steps must be in 1..{self.block_size}")

    @property
    def steps(self) -> int:
        return self.teacher_steps or self.block_size


# -- Phase 1: the distillation set and its rollouts -------------------------------------------------


@dataclass
class Rollout:
    """One teacher rollout of one study: what Phase 2 trains on."""

    example: int  # index into the distillation set (the images the teacher saw, rendered once)
    tokens: torch.Tensor  # [R] committed tokens up to the end of the EOS block (R: whole blocks)
    step: torch.Tensor  # [R] long: unmask step within the block; NO_TARGET after the first EOS
    top_idx: torch.Tensor  # [R, k] int32
    top_p: torch.Tensor  # [R, k] float32
    rest: torch.Tensor  # [R] float32
    block_steps: torch.Tensor  # [R] long: steps the position's block took (S_b)
    end: int  # index of the first EOS, -1 for a rollout that hit max_new_tokens without one


def stratified_sample(records: list, n: int, seed: int) -> list:
    """n records spread over sources in proportion to their size (largest remainder), at least one
    per source while n allows; within a source, a seeded random choice."""
    import random

    by_source: dict[str, list] = {}
    for r in records:
        by_source.setdefault(r.source, []).append(r)
    n = min(n, len(records))
    sources = sorted(by_source)
    share = {s: n * len(by_source[s]) / len(records) for s in sources}
    take = {s: int(share[s]) for s in sources}
    if n >= len(sources):
        take = {s: max(1, t) for s, t in take.items()}
    while sum(take.values()) > n:
        take[max(sources, key=lambda s: take[s] - share[s])] -= 1
    while sum(take.values()) < n:
        open_ = [s for s in sources if take[s] < len(by_source[s])]
        take[max(open_, key=lambda s: share[s] - take[s])] += 1
    rng = random.Random(seed)
    out = []
    for s in sources:
        out += rng.sample(by_source[s], take[s])
    return out


def distill_examples(
    corpus: str,
    n: int,
    *,
    image_size: int,
    seed: int,
    sample_seed: int | None = None,
    image_source: str = "auto",
) -> list:
    """A distillation set: n training studies sampled across sources (`sample_seed`), each rendered
    once (phantom `seed`), so the student trains on the very images the teacher decoded."""
    from pathlib import Path

    from echocxr.batch import Example
    from echocxr.data.images import study_images
    from echocxr.data.phantom import MIN_SIZE
    from echocxr.data.records import load_corpus
    from echocxr.errors import UserError

    records = [r for r in load_corpus(corpus, split="train") if r.findings or r.impression]
    if not records:
        raise UserError(f"{corpus}: no training records with a report to distil on")
    root = Path(corpus).parent
    size = max(image_size, MIN_SIZE)  # phantoms have a smallest size; the processor resizes anyway
    out = []
    for r in stratified_sample(records, n, seed if sample_seed is None else sample_seed):
        images = study_images(r, size=size, seed=seed, epoch=None, source=image_source, root=root)
        out.append(Example(images, r.language, r.report, r.record_id, {"source": r.source}))
    return out


def _ar_rollout(example: int, tokens: list[int], row_trajectory, block: int, k: int, eos: int) -> Rollout:
    """An AR teacher's output (decoded as blocks of one token: row_trajectory[t] = [StepRecord of
    token t]) regrouped into blocks of `block`: position j was committed at step j mod block of its
    block, and block b took as many steps as it has positions up to the first EOS."""
    blocks = []
    for b in range(0, len(row_trajectory), block):
        recs = [steps[0] for steps in row_trajectory[b : b + block]]
        blocks.append(
            [StepRecord([j], r.tokens, r.confidence, r.top_idx, r.top_p, r.rest) for j, r in enumerate(recs)]
        )
    return _rollout(example, tokens, blocks, block, k, eos)


def _rollout(example: int, tokens: list[int], row_trajectory, block: int, k: int, eos: int) -> Rollout:
    """Teacher output of one row (tokens up to and including its first EOS, `cut_at_eos`) and its
    trajectory -> per-position targets over whole blocks up to its EOS block. Every position after
    the first EOS is EOS with no teacher target, whatever the teacher committed there (module
    docstring); S_b is the number of steps block b took."""
    R = -(-len(tokens) // block) * block
    ids = torch.full((R,), eos, dtype=torch.long)
    ids[: len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    end = tokens.index(eos) if eos in tokens else -1
    last = end if end >= 0 else R - 1  # the last position with a target
    step = torch.full((R,), NO_TARGET, dtype=torch.long)
    block_steps = torch.zeros(R, dtype=torch.long)
    top_idx = torch.zeros(R, k, dtype=torch.int32)
    top_p = torch.zeros(R, k)
    rest = torch.ones(R)
    for b, steps in enumerate(row_trajectory[: R // block]):
        for s, rec in enumerate(steps):
            pos = b * block + torch.as_tensor(rec.positions, dtype=torch.long)
            keep = pos <= last
            pos = pos[keep]
            step[pos] = s
            block_steps[pos] = len(steps)
            top_idx[pos] = torch.as_tensor(rec.top_idx, dtype=torch.int32)[keep, :k]
            top_p[pos] = torch.as_tensor(rec.top_p, dtype=torch.float32)[keep, :k]
            rest[pos] = torch.as_tensor(rec.rest, dtype=torch.float32)[keep]
    return Rollout(example, ids, step, top_idx, top_p, rest, block_steps, end)


@torch.no_grad()
def collect_rollouts(
    decoder: EchoVLM, examples: list, tokenizer, processor, cfg: DCDConfig, *, rank: int = 0, world: int = 1
) -> tuple[list, dict]:
    """Phase 1: decode every study with the multi-step block decoder and record its trajectory.
    Rollouts caught in a repetition loop are dropped and counted. With several processes, rank r
    decodes studies r, r + world, ... and the rollouts are then exchanged, so every rank ends with
    the same list (in study order) and no study is decoded twice. `decoder` must not be sharded:
    ranks run different numbers of forwards."""
    rollouts, looped, unfinished = decode_share(
        decoder, examples, range(rank, len(examples), world), tokenizer, processor, cfg
    )
    if world > 1:
        import torch.distributed as dist

        parts: list = [None] * world
        dist.all_gather_object(parts, (rollouts, looped, unfinished))
        rollouts = sorted((r for p in parts for r in p[0]), key=lambda r: r.example)
        looped, unfinished = sum(p[1] for p in parts), sum(p[2] for p in parts)
    stats = {"rollouts": len(rollouts), "discarded_loops": looped, "unfinished": unfinished}
    return rollouts, stats


@torch.no_grad()
def decode_share(
    decoder: EchoVLM, examples: list, indices, tokenizer, processor, cfg: DCDConfig
) -> tuple[list, int, int]:
    """Decode the studies `examples[i] for i in indices` (one rank's share) in batches of
    cfg.collect_batch -> (rollouts kept, rollouts dropped as loops, rollouts without an EOS)."""
    from echocxr.batch import Example, collate

    was_training = decoder.training
    decoder.eval()
    eos, tpi = decoder.special.eos, decoder.config.image_tokens
    mine = list(indices)
    rollouts, looped, unfinished = [], 0, 0
    max_new = cfg.max_new_tokens or decoder.config.max_response_tokens
    n_tokens = -(-max_new // cfg.block_size) * cfg.block_size
    ar = cfg.teacher_decoder == "ar"
    # an AR teacher is the block loop at block 1, one step: each token read from the logits at the
    # token before it (the shift), then committed (`model.denoise` module docstring)
    block, steps, strategy = (1, 1, "sequential") if ar else (cfg.block_size, cfg.steps, cfg.strategy)
    # the decoders' guard: the teacher never commits the mask token or a special token other than
    # EOS, so no rollout teaches the student one (its recorded distributions put 0 mass on them)
    banned = denoise.banned_tokens(decoder, tokenizer)
    for i in range(0, len(mine), cfg.collect_batch):
        idx = mine[i : i + cfg.collect_batch]
        prompts = [
            Example(examples[j].images, examples[j].language, None, examples[j].record_id) for j in idx
        ]
        batch = collate(prompts, tokenizer, processor, tpi).to(decoder.device)
        out = denoise.denoise_blocks(
            decoder,
            denoise.CachedContext(decoder, batch, n_tokens, block),
            batch.size,
            block=block,
            steps=steps,
            max_new_tokens=max_new,
            strategy=strategy,
            threshold=cfg.threshold,
            seed=cfg.seed,
            record_top_k=cfg.top_k,
            banned=banned,
        )
        for j, tokens, traj in zip(idx, out.tokens, out.trajectory, strict=True):
            body = tokens[:-1] if tokens and tokens[-1] == eos else tokens
            if repetition_loop(body):
                looped += 1
                continue
            unfinished += int(not tokens or tokens[-1] != eos)
            rollouts.append(
                (_ar_rollout if ar else _rollout)(j, tokens, traj, cfg.block_size, cfg.top_k, eos)
            )
    decoder.train(was_training)
    return rollouts, looped, unfinished


# -- the stage (the shared training loop calls loss / on_round_start) -------------------------------


class DCDStage:
    """Stage 3 for the shared loop. The loop's batches (ground-truth reports) feed only the
    `onestep-ft` ablation; DCD draws its batches from its own rollouts, since a target exists only
    for studies the teacher decoded, on the images it saw. `distill_set(round)` gives the studies
    of a round (deterministic, so a resumed run rebuilds them)."""

    name = "dcd"
    freeze_vision = True

    def __init__(
        self,
        cfg: DCDConfig,
        tokenizer,
        processor,
        distill_set,
        teacher: EchoVLM | None,
        total_steps: int | None = None,
    ):
        self.cfg = cfg
        self.total_steps = total_steps  # with it, rounds start at step r * total_steps // rounds
        # DCD trains on its own rollouts: a loop may skip loading its batches (only .size is read)
        self.uses_loop_batches = cfg.objective == "onestep-ft"
        self.multiple_of = cfg.block_size
        self.tokenizer, self.processor = tokenizer, processor
        self.distill_set, self.teacher = distill_set, teacher
        self.examples: list = []  # this round's studies
        self.rollouts: list[Rollout] = []
        self.round = -1
        self.collect_stats: list[dict] = []
        self.rank, self.world = 0, 1

    def set_distributed(self, rank: int, world: int) -> None:
        """Called by the loop: share rollouts out across ranks and draw distinct rows per rank."""
        self.rank, self.world = rank, world

    @property
    def rounds(self) -> int:
        return self.cfg.rounds

    @property
    def checkpoint_meta(self) -> dict:
        """Saved beside the weights (echocxr.json): decoders read the block size from it."""
        from dataclasses import asdict

        return {
            "stage": "dcd",
            "block_size": self.cfg.block_size,
            **checkpoint_fields(),
            "dcd": asdict(self.cfg),
            "dcd_rounds": self.collect_stats,
        }

    def on_round_start(self, model: EchoVLM, round_idx: int) -> None:
        if self.cfg.objective != "dcd" or round_idx <= self.round:
            return
        use_student = self.cfg.refresh == "student" and round_idx > 0
        decoder = model if use_student else self.teacher.to(model.device)
        if use_student and is_sharded(model):
            # ranks decode different studies for different numbers of forwards, which a sharded
            # model (a collective per layer) cannot do: decode with a full copy of the student
            decoder = self._full_copy(model)
        self.examples = self.distill_set(round_idx)
        self.rollouts, stats = collect_rollouts(
            decoder, self.examples, self.tokenizer, self.processor, self.cfg, rank=self.rank, world=self.world
        )
        if not self.rollouts:
            from echocxr.errors import UserError

            raise UserError(f"DCD round {round_idx}: every teacher rollout fell into a repetition loop")
        self.round = round_idx
        self.collect_stats.append(
            {"round": round_idx, "by": "student" if use_student else "teacher", **stats}
        )
        if self.rank == 0:
            print(
                f"dcd round {round_idx}: " + " ".join(f"{k}={v}" for k, v in self.collect_stats[-1].items())
            )

    def loss(self, model: EchoVLM, batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if self.cfg.objective == "onestep-ft":
            return onestep_ft_loss(model, batch, self.cfg.block_size, AR_SHIFT)
        # The round schedule does not depend on the loop calling on_round_start (a loop that does
        # call it with the same indices triggers nothing twice; a resumed run keeps its round).
        r = (
            0
            if not self.total_steps
            else min(self.cfg.rounds - 1, step * self.cfg.rounds // self.total_steps)
        )
        if r > self.round:
            self.on_round_start(model, r)
        # one global draw of size * world rows per step; each rank takes its own slice
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        pick = torch.randint(len(self.rollouts), (batch.size * self.world,), generator=g)
        pick = pick[self.rank * batch.size : (self.rank + 1) * batch.size].tolist()
        student_batch, targets = self.student_batch([self.rollouts[i] for i in pick], model)
        logits = rad_student_logits(model, student_batch, targets.tokens, self.cfg.block_size, AR_SHIFT)
        return dcd_loss(
            logits,
            targets,
            model.special.eos,
            kl=self.cfg.kl,
            alpha=self.cfg.alpha,
            eos_weight=self.cfg.eos_weight,
        )

    def _full_copy(self, model: EchoVLM) -> EchoVLM:
        """The teacher module (an unsharded copy) loaded with the sharded student's full weights
        (an all-gather per parameter: every rank calls this at the same round)."""
        from torch.distributed.tensor import DTensor

        with torch.no_grad():
            own = dict(self.teacher.named_parameters())
            for n, p in model.named_parameters():
                own[n].copy_(p.full_tensor() if isinstance(p, DTensor) else p)
        return self.teacher.to(model.device)

    def student_batch(self, rollouts: list[Rollout], model: EchoVLM):
        """Prompts (with the teacher's images) and EOS-padded targets for a list of rollouts."""
        from echocxr.batch import Example, collate

        exs = [self.examples[r.example] for r in rollouts]
        prompts = [Example(ex.images, ex.language, None, ex.record_id) for ex in exs]
        batch = collate(prompts, self.tokenizer, self.processor, model.config.image_tokens).to(model.device)
        R, k = max(len(r.tokens) for r in rollouts), self.cfg.top_k
        B, eos = len(rollouts), model.special.eos
        t = Targets(
            torch.full((B, R), eos, dtype=torch.long),
            torch.full((B, R), NO_TARGET, dtype=torch.long),
            torch.zeros(B, R, k, dtype=torch.long),
            torch.zeros(B, R, k),
            torch.ones(B, R),
            torch.zeros(B, R, dtype=torch.long),
            torch.zeros(B, R, dtype=torch.bool),
        )
        for b, r in enumerate(rollouts):
            n = len(r.tokens)
            t.tokens[b, :n], t.step[b, :n], t.top_idx[b, :n] = r.tokens, r.step, r.top_idx.long()
            t.top_p[b, :n], t.rest[b, :n], t.block_steps[b, :n] = r.top_p, r.rest, r.block_steps
            if r.end >= 0:
                t.end[b, r.end] = True
        return batch, Targets(*(getattr(t, f.name).to(model.device) for f in fields(Targets)))

    def state_dict(self) -> dict:
        return {
            "round": self.round,
            "collect_stats": self.collect_stats,
            "rollouts": [
                {"example": r.example, "tokens": r.tokens, "step": r.step}
                | {"top_idx": r.top_idx, "top_p": r.top_p, "rest": r.rest}
                | {"block_steps": r.block_steps, "end": r.end}
                for r in self.rollouts
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        self.round, self.collect_stats = state["round"], list(state["collect_stats"])
        self.examples = self.distill_set(self.round) if self.round >= 0 else []
        if state["rollouts"] and "end" not in state["rollouts"][0]:
            from echocxr.errors import UserError

            raise UserError(
                "this DCD resume state predates per-block step counts and the EOS end position "
                "(issue #20): start the DCD stage again without --resume"
            )
        self.rollouts = [
            Rollout(
                d["example"],
                d["tokens"],
                d["step"],
                d["top_idx"],
                d["top_p"],
                d["rest"],
                d["block_steps"],
                d["end"],
            )
            for d in state["rollouts"]
        ]


def onestep_ft_loss(model: EchoVLM, batch, block: int, shift: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """Ablation: plain one-step fine-tuning. Every block fully masked given the ground-truth blocks
    before it (the RAD layout at mask ratio 1), cross-entropy on every response position, EOS
    padding included."""
    logits = rad_student_logits(model, batch, batch.response_ids, block, shift)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.response_ids.flatten())
    return loss, {"ce": loss.item()}


# -- CLI (echocxr train --stage dcd) ------------------------------------------------------------------


def add_stage_arguments(parser) -> None:
    d = DCDConfig()
    g = parser.add_argument_group("DCD (stage 3)")
    g.add_argument("--teacher", help="RAD checkpoint that decodes the trajectories (default: --init)")
    g.add_argument("--objective", choices=OBJECTIVES, default=d.objective)
    g.add_argument("--kl", choices=KL_DIRECTIONS, default=d.kl, help="KL direction (paper: forward)")
    g.add_argument(
        "--alpha",
        type=float,
        default=d.alpha,
        help="step weight w = 1 + alpha * s / (S_b - 1), S_b: steps the block took",
    )
    g.add_argument("--no-step-weight", action="store_true", help="ablation: w = 1 for every position")
    g.add_argument("--eos-weight", type=float, default=d.eos_weight, help="weight of the EOS cross-entropy")
    g.add_argument("--no-eos-loss", action="store_true", help="ablation: drop the EOS cross-entropy")
    g.add_argument("--top-k", type=int, default=d.top_k, help="teacher probabilities kept per position")
    g.add_argument("--teacher-steps", type=int, default=None, help="teacher steps per block (default: B)")
    g.add_argument("--strategy", default=d.strategy, help="teacher unmasking order (decode.block)")
    g.add_argument("--threshold", type=float, default=d.threshold)
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=d.max_new_tokens,
        help="longest teacher rollout (default: the teacher's max_response_tokens)",
    )
    g.add_argument("--rounds", type=int, default=d.rounds, help="trajectory collection rounds")
    g.add_argument("--refresh", choices=REFRESH, default=d.refresh, help="who decodes rounds after the first")
    g.add_argument(
        "--teacher-decoder",
        choices=TEACHER_DECODERS,
        default=d.teacher_decoder,
        help="block: the RAD teacher's multi-step block decoder (paper); ar: an AR --teacher, left to right",
    )
    g.add_argument(
        "--distill-studies", type=int, default=d.distill_studies, help="studies, stratified by source"
    )
    g.add_argument("--collect-batch", type=int, default=d.collect_batch)
    if not any("--block-size" in a.option_strings for a in parser._actions):
        g.add_argument("--block-size", type=int, default=None, help="default: the checkpoint's block size")


def build_stage(args, model: EchoVLM, tokenizer, processor) -> DCDStage:
    from echocxr.train.lora import dcd_teacher

    meta_block = None
    init = getattr(args, "init", None)
    if init:
        import json
        from pathlib import Path

        meta_file = Path(init) / "echocxr.json"
        if meta_file.is_file():
            meta_block = json.loads(meta_file.read_text()).get("block_size")
    cfg = DCDConfig(
        block_size=args.block_size or meta_block or DCDConfig.block_size,
        objective=args.objective,
        kl=args.kl,
        alpha=0.0 if args.no_step_weight else args.alpha,
        eos_weight=0.0 if args.no_eos_loss else args.eos_weight,
        top_k=args.top_k,
        teacher_steps=args.teacher_steps,
        strategy=args.strategy,
        threshold=args.threshold,
        max_new_tokens=args.max_new_tokens,
        rounds=args.rounds,
        refresh=args.refresh,
        teacher_decoder=args.teacher_decoder,
        distill_studies=args.distill_studies,
        collect_batch=args.collect_batch,
        seed=args.seed,
    )
    model.visual.requires_grad_(False)  # DCDStage.freeze_vision, as in RAD
    if cfg.objective == "onestep-ft":
        return DCDStage(cfg, tokenizer, processor, lambda r: [], None, getattr(args, "steps", None))
    if args.teacher:
        teacher, *_ = EchoVLM.from_pretrained(args.teacher)
        teacher.eval().requires_grad_(False)
    else:  # the student starts as the teacher: a frozen copy, or with LoRA the student, adapters off
        teacher = dcd_teacher(model, getattr(args, "lora_rank", 0))

    def distill_set(round_idx: int) -> list:
        return distill_examples(
            args.corpus,
            cfg.distill_studies,
            image_size=model.config.image_size,
            seed=args.seed,
            sample_seed=args.seed * 1_000_003 + round_idx,
            image_source=getattr(args, "image_source", "auto"),
        )

    return DCDStage(cfg, tokenizer, processor, distill_set, teacher, getattr(args, "steps", None))
