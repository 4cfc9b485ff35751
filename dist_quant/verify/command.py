"""The ``verify`` command: run the claim checks, print the table, exit 1 if any fails.

    dist-quant verify            # table, details (the 1d depth experiment), summary
    dist-quant verify --json     # one JSON object: rows, numbers, seed, seconds
    dist-quant verify --only 4   # claims whose id starts with 4 (comma-separated prefixes)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import click
import torch

from dist_quant.verify import bn_claims, bucket_claims, init_claims, optim_claims, quant_claims
from dist_quant.verify.report import Context, Row, format_table, to_json

ALL_CLAIMS: list[Callable[[Context], list[Row]]] = [
    *init_claims.CLAIMS, *bn_claims.CLAIMS, *quant_claims.CLAIMS, *bucket_claims.CLAIMS,
    *optim_claims.CLAIMS,
]


def claim_id(check: Callable) -> str:
    return check.__name__.removeprefix("claim_")


def run_claims(ctx: Context, only: tuple[str, ...] = ()) -> list[Row]:
    """Run the selected checks in order; a check that raises becomes a failing row."""
    rows: list[Row] = []
    for check in ALL_CLAIMS:
        cid = claim_id(check)
        if only and not any(cid.startswith(prefix) for prefix in only):
            continue
        try:
            rows += check(ctx)
        except Exception as err:  # report it as a failure of that claim, run the others
            rows.append(Row(cid, f"check raised {type(err).__name__}: {err}", "-", "error", "-",
                            False))
    return rows


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the "
              "table.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of every generator the checks use.")
@click.option("--only", default="", help="Comma-separated claim-id prefixes to run (e.g. "
              "'4' or '1d,5c'); default: all.")
def verify(as_json: bool, seed: int, only: str) -> None:
    """Check every numbered claim of the mathematics empirically (1a-5d, stated in
    docs/claims.md).

    Prints one row per check: the claim, what theory predicts, what was measured, the
    tolerance (derived from the statistics of the measurement) and ok/FAIL. Exit status 1 if any
    check fails.
    """
    torch.set_num_threads(1)
    start = time.perf_counter()
    ctx = Context(seed=seed)
    prefixes = tuple(p.strip() for p in only.split(",") if p.strip())
    rows = run_claims(ctx, prefixes)
    if not rows:
        raise click.BadParameter(f"no claim id starts with {only!r}", param_hint="--only")
    seconds = time.perf_counter() - start
    failed = [r for r in rows if not r.passed]
    if as_json:
        click.echo(to_json(rows, ctx, seconds))
    else:
        click.echo(format_table(rows))
        for text in ctx.details.values():
            click.echo("\n" + text)
        claims = sorted({r.claim for r in rows}, key=lambda c: (len(c), c))
        click.echo(f"\n{len(rows) - len(failed)}/{len(rows)} checks passed, {len(claims)} "
                   f"claims, seed {seed}, {seconds:.1f} s")
    if failed:
        raise SystemExit(1)
