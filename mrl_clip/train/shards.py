"""The training shards: brace-expanded URL lists, which local ones are missing, and the dataset size beside them
(open_clip's sizes.json convention)."""
import os
import sys
from typing import Optional

from open_clip_train.data import expand_urls, get_dataset_size

from ..errors import UserError


def resolve_shards(urls: str, allow_missing: bool = False) -> list[str]:
    """Brace-expand `urls` ('a-{0000..0099}.tar', '::' joins lists) and check local shards exist (unless
    `allow_missing`: the trainer has already decided how many missing shards it tolerates)."""
    try:
        shards, _ = expand_urls(urls)
    except Exception as err:  # braceexpand raises on malformed patterns
        raise UserError(f"cannot expand shard pattern {urls!r}: {err}") from None
    shards = [s for s in shards if s.strip()]
    if not shards:
        raise UserError(f"shard pattern {urls!r} names no shards")
    missing = missing_shards(shards)
    if missing and not allow_missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"missing shard {missing[0]}{more}")
    return shards


def missing_shards(shards: list[str]) -> list[str]:
    return [s for s in shards if "://" not in s and not s.startswith("pipe:") and not os.path.isfile(s)]


def check_shards(urls: str, max_missing_fraction: float) -> list[str]:
    """The shards of `urls`. Missing ones are tolerated, with a warning, up to `max_missing_fraction` of them
    (training skips and counts them like bad samples); all missing, or more than that, is an error."""
    shards = resolve_shards(urls, allow_missing=True)
    missing = missing_shards(shards)
    if missing and (len(missing) == len(shards) or len(missing) > max_missing_fraction * len(shards)):
        more = f" (and {len(missing) - 1} more of {len(shards)})" if len(missing) > 1 else ""
        raise UserError(f"missing shard {missing[0]}{more}")
    if missing:
        print(f"warning: {len(missing)} of {len(shards)} shards missing, they will be skipped: "
              f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}", file=sys.stderr)
    return shards


def count_samples(urls: str) -> Optional[int]:
    """Dataset size from sizes.json / __len__ beside the shards (open_clip's convention), or None."""
    try:
        num_samples, _ = get_dataset_size(urls)
    except KeyError as err:
        raise UserError(f"sizes.json beside the shards has no entry for {err.args[0]}: fix it or pass "
                        "--train-num-samples") from None
    except (ValueError, SyntaxError) as err:  # not JSON / not a literal / not a number
        raise UserError(f"cannot read the dataset size beside the shards (sizes.json or __len__): {err}; "
                        "fix it or pass --train-num-samples") from None
    return num_samples or None
