"""The 1-bit colocated exchange as a DDP communication hook.

>>> from dist_quant.baselines.hooks import OneBitState, onebit_hook
>>> state = OneBitState(process_group=None, compressor="onebit", bucket_size=128, seed=0)
>>> ddp_model.register_comm_hook(state, onebit_hook)              # doctest: +SKIP

The placement of the exchange is here; the arithmetic is the compressors'
(:mod:`dist_quant.compress`), the moving of bytes :mod:`dist_quant.core.collective`'s.
"""

# No ``from __future__ import annotations``: DDP compares the hook's annotations with
# ``dist.GradBucket`` and ``torch.futures.Future[torch.Tensor]`` as objects.

import numbers
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_quant.compress import ErrorFeedback, get_compressor
from dist_quant.compress.base import Compressor
from dist_quant.compress.shift import ShiftedServer, ShiftedWorker, parse_shift_rate
from dist_quant.core.collective import Transfer, all_gather, all_to_all, slice_bounds
from dist_quant.errors import NonFiniteGradientError
from dist_quant.ps.common import DOWNLINK, QUANTISER, generator

ALLGATHER_BITS = 4    # the all-gather's kbit levels for a quantising uplink (see OneBitState)
# the compressors whose all-gather is their own format (public name; the hook asks the
# compressor, ``Compressor.floating``)
FLOAT_FORMATS = ("none", "fp16", "bf16")


@dataclass(frozen=True)
class SlicePlan:
    """How a bucket of ``n`` coordinates is cut and what each slice's payloads weigh."""

    bounds: tuple[int, ...]      # W + 1 offsets; slice s is [bounds[s], bounds[s + 1])
    up_nbytes: tuple[int, ...]   # payload bytes of slice s in the all-to-all (0 if empty)
    down_nbytes: tuple[int, ...]  # payload bytes of slice s in the all-gather (0 if empty)

    def coords(self, s: int) -> int:
        return self.bounds[s + 1] - self.bounds[s]


class OneBitState:
    r"""State of :func:`onebit_hook`: the compressors, one generator per rank and direction,
    the error-feedback residuals (if any) and the byte counters.

    Args:
        process_group: the group whose ranks exchange (``None``: the default group).
        compressor: any name of :func:`dist_quant.compress.get_compressor`; ``onebit`` (the
            unbiased 1-bit rule with minimum-variance ``(a, b)`` per bucket) by default. Fewer
            bits per coordinate move less and add more variance; ``none`` sends fp32 and equals
            an allreduce up to rounding.
        bucket_size: coordinates per ``(a, b)`` header (onebit, kbit, sign); smaller buckets
            cost ``64 / d`` bits per coordinate with fp32 headers and add far less variance.
            ``0`` gives each slice one header (the sheet's whole-tensor rule, per slice).
        error_feedback: carry what compression dropped into the next step, on both moves (each
            rank for every slice it sends, each owner for the slice it re-encodes, as DeepSpeed's
            compressed allreduce does). Needed by a biased compressor (``sign``); around
            stochastic 1-bit rounding the carried error grows and long runs diverge.
        seed: run seed. Rank ``r`` draws its all-to-all payloads from
            ``generator(seed, r, QUANTISER)`` and its all-gather payloads from
            ``generator(seed, r, DOWNLINK)`` (:mod:`dist_quant.ps.common`): independent
            across ranks (MATH 4h), reproducible from the config.
        bits: levels ``2^bits`` of the ``kbit`` compressor.
        header_dtype: type of the ``(a, b)`` headers on the wire: ``fp32``, ``fp16`` or ``bf16``
            (rounded outward, so the decode stays unbiased).
        allgather_bits: how each owner re-encodes its averaged slice for the all-gather:
            ``1..8``: ``kbit`` stochastic rounding to ``2^k`` levels (1: the onebit rule) in the
            uplink's buckets and header type, with fresh draws; ``32``: fp32. ``None``
            (default): the uplink's own format for ``none``/``fp16``/``bf16`` (so ``none`` is
            an fp32 allreduce), else ``ALLGATHER_BITS = 4``; resolved in ``.allgather_bits``.
            The re-encode's variance is not divided by ``W`` (see :func:`onebit_hook`): at 1
            bit it adds about one rank's quantisation noise, at ``k`` bits ``(2^k - 1)^2``
            times less (the accuracies this costs on the default job: the README's DDP hook
            section).
        shift_rate: shifted compression on the all-to-all (:mod:`dist_quant.compress.shift`):
            rank r sends ``C(g_s - h_{r,s})`` for each slice s, the owner of slice s keeps
            every rank's ``h_{r,s}`` and averages ``h + decode``; both move the shift by
            ``shift_rate`` times the decode. ``0`` (default): off; ``"auto"``:
            ``1 / (1 + omega)`` (DIANA's bound; 1 for ``sign``, i.e. EF21). Not with
            ``error_feedback``. A slice with a non-finite payload decodes to NaN, as without
            shifts; the shifts of the other ranks still move. Like the residuals, shifts of a
            bucket whose parameters changed restart at zero.

    Bad settings raise ``ValueError`` (:class:`dist_quant.errors.ConfigError`) here, not at the
    first backward.

    DDP rebuilds its buckets once after the first iteration; an error-feedback residual whose
    bucket changed its parameters is dropped (it restarts at zero), so the carried error of the
    first iteration is lost, as PowerSGD avoids by starting compression at iteration 2.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None,
                 compressor: str = "onebit", bucket_size: int = 128,
                 error_feedback: bool = False, seed: int = 0, bits: int = 2,
                 header_dtype: str = "fp32", allgather_bits: int | None = None,
                 shift_rate: float | str = 0):
        if allgather_bits is not None and (isinstance(allgather_bits, bool)
                                           or allgather_bits not in (*range(1, 9), 32)):
            raise ValueError(f"allgather_bits: must be 1..8 (kbit), 32 (fp32) or None; got "
                             f"{allgather_bits!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed: must be an integer; got {seed!r}")
        if not isinstance(error_feedback, bool):
            raise ValueError(f"error_feedback: must be True or False; got {error_feedback!r}")
        try:
            self.shift_rate = parse_shift_rate(shift_rate)  # None: auto
        except ValueError as err:
            raise ValueError(f"shift_rate: {err}") from None
        self.shifted = self.shift_rate is None or self.shift_rate > 0
        if self.shifted and error_feedback:
            raise ValueError("shift_rate: shifts and error_feedback both correct the "
                             "compression error; use one")
        # get_compressor validates the name, bucket_size, bits, header_dtype (ConfigError)
        self.up: Compressor = get_compressor(compressor, bucket_size=bucket_size, bits=bits,
                                             header_dtype=header_dtype)
        if allgather_bits is None and self.up.floating:
            self.down: Compressor = self.up
            allgather_bits = self.up.bits
        elif (allgather_bits or ALLGATHER_BITS) == 32:
            self.down = get_compressor("none")
        else:
            allgather_bits = allgather_bits or ALLGATHER_BITS
            self.down = get_compressor("kbit", bits=allgather_bits, bucket_size=bucket_size,
                                       header_dtype=header_dtype)
        self.process_group = process_group
        self.compressor, self.bucket_size, self.bits = compressor, bucket_size, bits
        self.header_dtype, self.allgather_bits = header_dtype, allgather_bits
        self.error_feedback, self.seed = error_feedback, seed
        self._slice_bucket = self.up.bucket_size if self.up.slice_aligned else 0
        self._plans: dict[tuple[int, int], SlicePlan] = {}
        self._generators: dict[tuple[torch.device, int], torch.Generator] = {}
        # bucket index -> (parameter layout, one residual per slice sent, one for the owner's)
        self._feedback: dict[int, tuple[tuple, list[ErrorFeedback], ErrorFeedback]] = {}
        # bucket index -> (parameter layout, one shift per slice sent, the owner's copies)
        self._shifts: dict[int, tuple[tuple, list[ShiftedWorker], ShiftedServer]] = {}
        self._pending: torch.futures.Future | None = None
        self.reset_stats()

    # ---- bookkeeping -------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Zero the byte counters."""
        self.buckets = 0             # hook calls that exchanged something
        self.coordinates = 0         # coordinates of those buckets
        self.sent_up = self.received_up = 0      # this rank, all-to-all
        self.sent_down = self.received_down = 0  # this rank, all-gather
        self.fp32_sent = 0           # this rank's sends, were the payloads raw fp32
        self.world_up = self.world_down = 0      # all ranks together (sent = received)

    @property
    def bytes_sent(self) -> int:
        return self.sent_up + self.sent_down

    @property
    def bytes_received(self) -> int:
        return self.received_up + self.received_down

    def compression_stats(self) -> tuple[float, int, int]:
        """``(compress_rate, fp32_bytes, bytes_sent)`` of this rank since the last
        :meth:`reset_stats`, as PowerSGD's ``compression_stats`` gives element counts:
        ``fp32_bytes`` is what this rank would have sent in the same exchange with raw fp32
        values (``4 (n - n_r) + 4 (W - 1) n_r`` per bucket, on average the share of a ring
        allreduce of fp32), ``bytes_sent`` what it did send (payload bytes, both moves)."""
        rate = self.fp32_sent / self.bytes_sent if self.bytes_sent else 0.0
        return rate, self.fp32_sent, self.bytes_sent

    def plan(self, n: int, world: int) -> SlicePlan:
        """The slices of a bucket of ``n`` coordinates over ``world`` ranks (cached)."""
        key = (n, world)
        if key not in self._plans:
            bounds = tuple(slice_bounds(n, world, self._slice_bucket))
            sizes = [bounds[s + 1] - bounds[s] for s in range(world)]
            self._plans[key] = SlicePlan(
                bounds, tuple(self.up.payload_nbytes(k) if k else 0 for k in sizes),
                tuple(self.down.payload_nbytes(k) if k else 0 for k in sizes))
        return self._plans[key]

    def generator(self, device: torch.device, rank: int, tag: int) -> torch.Generator:
        key = (device, tag)
        if key not in self._generators:
            self._generators[key] = generator(device, self.seed, rank, tag)
        return self._generators[key]

    def feedback(self, bucket: dist.GradBucket,
                 world: int) -> tuple[list[ErrorFeedback], ErrorFeedback]:
        """The residuals of ``bucket``: fresh (zero) if its parameters changed."""
        layout = tuple((p.data_ptr(), p.numel()) for p in bucket.parameters())
        kept = self._feedback.get(bucket.index())
        if kept is None or kept[0] != layout:
            kept = (layout, [ErrorFeedback(self.up) for _ in range(world)],
                    ErrorFeedback(self.down))
            self._feedback[bucket.index()] = kept
        return kept[1], kept[2]

    def shifts(self, bucket: dist.GradBucket,
               world: int) -> tuple[list[ShiftedWorker], ShiftedServer]:
        """The shifts of ``bucket``: this rank's for every slice it sends, and its copies of
        every rank's shift of the slice it owns; fresh (zero) if its parameters changed."""
        layout = tuple((p.data_ptr(), p.numel()) for p in bucket.parameters())
        kept = self._shifts.get(bucket.index())
        if kept is None or kept[0] != layout:
            kept = (layout, [ShiftedWorker(self.up, self.shift_rate) for _ in range(world)],
                    ShiftedServer(self.up, self.shift_rate))
            self._shifts[bucket.index()] = kept
        return kept[1], kept[2]

    def _count(self, plan: SlicePlan, rank: int, world: int, up: Transfer,
               down_sent: int, down_received: int) -> None:
        n = plan.bounds[-1]
        self.buckets += 1
        self.coordinates += n
        self.sent_up += up.sent
        self.received_up += up.received
        self.sent_down += down_sent
        self.received_down += down_received
        own = plan.coords(rank)
        self.fp32_sent += 4 * (n - own) + 4 * (world - 1) * own
        self.world_up += (world - 1) * sum(plan.up_nbytes)
        self.world_down += (world - 1) * sum(plan.down_nbytes)


def _encode(encoder, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The payload bytes of ``x``; a gradient holding NaN/Inf travels as a non-finite payload
    of the same length (the receivers then fill the slice with NaN, as plain DDP would
    propagate it)."""
    try:
        return encoder.encode(x, generator=gen).to_tensor()
    except NonFiniteGradientError as err:
        return encoder.nonfinite_payload(x.numel(), err.count).to_tensor().to(x.device)


def onebit_hook(state: OneBitState, bucket: dist.GradBucket
                ) -> torch.futures.Future[torch.Tensor]:
    r"""Average the gradient bucket with the colocated compressed exchange: every rank owns
    one slice of the bucket, receives everyone's compressed copy of it, averages it and hands
    the average to every other rank, re-encoded (4-bit by default).

    Rank ``r`` of ``W``, bucket of ``n`` coordinates:

    1. Cuts the flat bucket into ``W`` contiguous slices on compressor-bucket boundaries
       (:func:`dist_quant.core.collective.slice_bounds`); rank ``s`` owns slice ``s``. Slices differ
       by at most one compressor bucket; a bucket of fewer compressor buckets than ranks leaves
       some ranks owning nothing.

    2. Encodes each slice with the compressor, drawing from its own generator
       ``(seed, r, QUANTISER)`` (with error feedback: slice plus its residual).

    3. Compressed all-to-all: hands payload ``s`` to rank ``s`` and receives the ``W - 1``
       other ranks' payloads of its own slice ``r`` (:func:`dist_quant.core.collective.all_to_all`).

    4. Decodes and averages the ``W`` payloads of slice ``r`` (``decode_mean``).

    5. Re-encodes the average (``allgather_bits = k`` in 1..8: ``kbit`` with ``2^k`` levels in
       the same buckets, drawing from generator ``(seed, r, DOWNLINK)``; 32: fp32) and hands it
       to every other rank (:func:`dist_quant.core.collective.all_gather`).

    6. Decodes all ``W`` slices into the bucket. Every rank decodes the same bytes with the
       same code, so every rank holds the same averaged gradient, bit for bit, and the
       replicas stay equal.

    What travels (``P(m)``: the compressor's ``payload_nbytes`` of ``m`` coordinates, a 32-byte
    header and the body; ``Q`` the same for the all-gather's payloads; ``n_s`` slice ``s``'s
    size; empty slices send nothing). Rank ``r`` sends ``sum_{s != r} P(n_s)`` and receives
    ``(W - 1) P(n_r)`` in step 3, sends ``(W - 1) Q(n_r)`` and receives ``sum_{s != r} Q(n_s)``
    in step 5. All ranks together: ``(W - 1) sum_s P(n_s)`` + ``(W - 1) sum_s Q(n_s)``, against
    ``2 (W - 1) 4 n`` for a ring allreduce of fp32. With ``onebit`` in buckets of 128 and fp32
    headers, ``P(m) ~ 1.5 m / 8`` bytes (21 times fewer than fp32); the default 4-bit
    all-gather, ``Q(m) ~ 4.5 m / 8`` (7 times fewer): 3 bits per coordinate on the average of
    the two moves, 10.7 times fewer bytes than the fp32 allreduce.

    Variance added (MATH 4c, 4g, 4h), per coordinate ``i``; rank ``r``'s gradient ``g_r`` has
    range ``[m_r, M_r]`` in ``i``'s compressor bucket, ``gbar_i = mean_r g_{r,i}``:

    - Step 4, ``avg_i = (1/W) sum_r Q_r(g_r)_i``: unbiased, ``E[avg_i] = gbar_i``, and the
      draws of the ranks are independent, so
      ``V_up,i = (1/W^2) sum_r (g_{r,i} - m_r)(M_r - g_{r,i})`` (onebit; kbit: the distance to
      the two neighbouring levels), the average of the ranks' variances divided by ``W``.
    - Step 5, ``k`` bits: the owner rounds ``avg`` again, unbiased given ``avg``, so the result
      stays unbiased and adds ``E[(avg_i - l_i)(u_i - avg_i)]``, ``l_i <= avg_i <= u_i`` being
      the neighbouring levels of ``avg``'s ``2^k`` levels in the bucket. ``avg_i`` lies in
      ``[mean_r m_r, mean_r M_r]``, so this is at most
      ``(mean_r (M_r - m_r))^2 / (4 (2^k - 1)^2)``. It is not divided by ``W``: at ``k = 1``
      about one rank's own 1-bit noise, so the exchange adds about ``1 + 1/W`` times one rank's
      noise where the parameter server with an fp32 downlink adds ``1/W`` of it (too much:
      see ``allgather_bits`` in :class:`OneBitState`); at ``k = 4``, 225 times less.
    - Step 5, 32 bits (fp32): adds nothing but float32 rounding, and moves
      ``(W - 1) (32 + 4 n_s)`` bytes per slice.

    Biased compressors (``sign``, and ``fp16``/``bf16`` by rounding) lose the unbiasedness;
    ``sign`` needs ``error_feedback=True``.

    When to use it: links that are the bottleneck (a capped or shared network), where a fp32
    allreduce's ``2 (W - 1) 4 n`` bytes dominate the step; each rank's link then carries about
    ``2 (W - 1) / W`` payloads each way per step, as much as a ring allreduce of the compressed
    size. It pays when the batch gradient's own noise is large next to the added quantisation
    noise (small compressor buckets: 128 is the project's default). On fast links the encode
    and decode may cost more than they save. A group of one rank sends nothing and returns
    the gradient as it is. The exchange of a bucket runs while backward computes the next;
    the exchanges of successive buckets are serialised (the all-gather of bucket ``k`` is
    issued on every rank before the all-to-all of bucket ``k + 1``, so all ranks issue the
    collectives in the same order).

    Bytes are counted exactly from the payload sizes in ``state`` (``sent_up``,
    ``received_up``, ``sent_down``, ``received_down``, ``world_up``, ``world_down``,
    :meth:`OneBitState.compression_stats`).

    Args:
        state (OneBitState): compressors, generators, residuals and counters.
        bucket (dist.GradBucket): the flat gradient bucket DDP hands over (any size and float
            dtype; payloads decode to float32).

    Returns:
        Future of the bucket, averaged in place.

    Example::
        >>> # xdoctest: +SKIP
        >>> state = OneBitState(process_group=None, compressor="onebit", bucket_size=128,
        ...                     seed=0)
        >>> ddp_model.register_comm_hook(state, onebit_hook)
        >>> loss_fn(ddp_model(x), y).backward()   # p.grad: the same averaged gradient on all
        >>> state.compression_stats()             # (rate, fp32 bytes, bytes sent)
    """
    group = state.process_group
    world = dist.get_world_size(group)
    buf = bucket.buffer()
    if world == 1:
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(buf)
        return done
    rank = dist.get_rank(group)
    plan = state.plan(buf.numel(), world)
    # steps 1-2, overlapping the previous bucket's exchange
    owner = None
    if state.error_feedback:
        up_encoders, down_encoder = state.feedback(bucket, world)
    elif state.shifted:
        (up_encoders, owner), down_encoder = state.shifts(bucket, world), state.down
    else:
        up_encoders, down_encoder = [state.up] * world, state.down
    gen_up = state.generator(buf.device, rank, QUANTISER)
    send = [_encode(up_encoders[s], buf[plan.bounds[s]:plan.bounds[s + 1]], gen_up)
            if plan.coords(s) else buf.new_empty(0, dtype=torch.uint8) for s in range(world)]
    if state._pending is not None:  # keep the collectives in the same order on all ranks
        state._pending.wait()
    # step 3
    up = all_to_all(send, [plan.up_nbytes[rank]] * world, group, async_op=True)

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        fut.wait()
        # steps 4-5
        lo, hi = plan.bounds[rank], plan.bounds[rank + 1]
        own = buf.new_empty(0, dtype=torch.uint8)
        if hi > lo:
            try:
                if owner is None:
                    avg = state.up.decode_mean(up.buffer.view(world, -1))
                else:
                    avg, bad = owner.aggregate(up.buffer.view(world, -1))
                    if bad:
                        raise NonFiniteGradientError(1, hi - lo)
            except NonFiniteGradientError:
                avg = torch.full((hi - lo,), float("nan"), device=buf.device)
            own = _encode(down_encoder, avg, state.generator(buf.device, rank, DOWNLINK))
        down = all_gather(own, plan.down_nbytes, group).wait()
        # step 6
        for s, row in enumerate(down.rows()):
            if plan.coords(s):
                _decode_into(state.down, row, buf[plan.bounds[s]:plan.bounds[s + 1]])
        state._count(plan, rank, world, up, down.sent, down.received)
        return buf

    result = up.future().then(finish)
    state._pending = result
    return result


def _decode_into(decoder: Compressor, payload: torch.Tensor, out: torch.Tensor) -> None:
    try:
        if out.dtype == torch.float32 and out.is_contiguous():
            decoder.decode(payload, out=out)
        else:
            out.copy_(decoder.decode(payload))
    except NonFiniteGradientError:
        out.fill_(float("nan"))
