"""--dataset-type csv: open_clip_train's CsvDataset input (a table of image paths and captions, read with pandas as
it reads it) fed through the webdataset stream, so a csv run resumes at any step and counts bad samples as a shard
run does.

The rows are cut into blocks of CSV_BLOCK_ROWS, named like shards ('train.csv#00003'), which the stream shuffles and
splits across ranks and workers as it does tar shards; each row becomes a sample {__key__: its row number,
__url__: its block, txt, __image_path__} whose image file is read only when the sample is decoded (not for the
samples a resume skips). A missing or unreadable image is a bad sample, named block:row."""
import os
from dataclasses import dataclass

from ..errors import UserError

CSV_BLOCK_ROWS = 512
IMAGE_PATH = "__image_path__"


@dataclass(frozen=True)
class CsvSource:
    path: str
    images: tuple
    captions: tuple

    @property
    def blocks(self) -> list[str]:
        count = max(1, -(-len(self.images) // CSV_BLOCK_ROWS))
        return [f"{os.path.basename(self.path)}#{b:05d}" for b in range(count)]

    def samples(self, src, handler=None):
        """The samples of the blocks named in `src` (webdataset's {"url": ...} dicts), in row order."""
        for item in src:
            block = int(item["url"].rsplit("#", 1)[1])
            for row in range(block * CSV_BLOCK_ROWS, min((block + 1) * CSV_BLOCK_ROWS, len(self.images))):
                yield {"__key__": f"{row:09d}", "__url__": item["url"], IMAGE_PATH: str(self.images[row]),
                       "txt": str(self.captions[row]).encode("utf-8")}


def read_csv(path: str, img_key: str, caption_key: str, sep: str) -> CsvSource:
    """The table as open_clip_train's CsvDataset reads it (pandas.read_csv(path, sep=sep), then the two columns);
    a missing column or an unreadable file is one line."""
    import pandas as pd

    try:
        df = pd.read_csv(path, sep=sep)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise UserError(f"cannot read csv {path}: {str(err).splitlines()[0][:200]}") from None
    for flag, key in (("--csv-img-key", img_key), ("--csv-caption-key", caption_key)):
        if key not in df.columns:
            columns = ", ".join(map(str, df.columns[:8]))
            raise UserError(f"csv {path} has no column {key!r} ({flag}); its columns, split by --csv-separator "
                            f"{sep!r}: {columns}")
    if len(df) == 0:
        raise UserError(f"csv {path} has no rows")
    # a caption pandas read as NaN (an empty cell) stays missing: the stream counts it as a bad sample
    captions = tuple("" if pd.isna(c) else str(c) for c in df[caption_key].tolist())
    return CsvSource(path, tuple(df[img_key].tolist()), captions)


def with_image(sample, image_keys) -> dict:
    """A csv sample with its image file's bytes under its extension's key (one of `image_keys`, else the first;
    PIL tells the format from the bytes), or without an image when the file cannot be read."""
    path = sample[IMAGE_PATH]
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return {k: v for k, v in sample.items() if k != IMAGE_PATH}
    return {**{k: v for k, v in sample.items() if k != IMAGE_PATH}, ext if ext in image_keys else image_keys[0]: data}
