"""Stage 1 of train_sd3.py: every image through the VAE and every caption through the text
encoders, once, so that distillation runs with the encoders freed (T5-XXL alone is 9 GB in bf16).

    CACHE/settings.json            what made the cache (resolution, encoder dtype, T5 length, ...)
    CACHE/empty.safetensors        ∅: the encoding of "" (tokens (1, L, D), pooled (1, P))
    CACHE/items/0000042.safetensors  x0 (C, h, w) model-space latent, tokens (L, D), pooled (P,),
                                   and in its metadata the source it was made from (see source_of)
    CACHE/index.json               written last: which items decoded, which images were skipped,
                                   and the sources of every row

A cache made with other settings is refused: latents and text embeddings from another encoder
dtype or T5 length have produced NaN losses in other training code. The settings include the name,
size and modification time of every file of the text encoders, tokenizers and VAE
(`encoder_files`), so new weights at the same --model path are not met with old encodings (the
transformer's own files do not enter: the cache does not depend on them). Each item records what it
was made from (image name, size, modification time, caption), so a re-run into the same cache
re-encodes exactly the items whose image or caption changed, new images and skipped images that
changed (a corrupt file replaced by a good one). Items are written one by one, so a stopped
stage 1 resumes where it was.
"""

import json
import os

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..checkpoint import atomic_write
from ..guidance import Text
from ..safetensors import load_file, read_header, save_file
from .data import list_items, load_image
from .loader import load_vae
from .prompt import SD3_JOINT_DIM, SD3_T5_LENGTH, TextEncoders

CLIP_LENGTH = 77  # tokens of each CLIP encoder, before T5's in SD3's sequence


def item_path(folder, i):
    return os.path.join(folder, "items", f"{i:07d}.safetensors")


def source_of(data_dir, path, caption):
    """What a cache item is made from: the image's name in the data folder, its size and
    modification time in ns, and the caption itself. The caption is kept as text, not as its
    file's time: a file's mtime moves in steps of the kernel's clock tick (a few ms), so a caption
    edited twice within one tick to the same length would look unchanged."""
    st = os.stat(path)
    return {"file": os.path.relpath(path, data_dir), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "caption": caption}


def item_source(folder, i):
    """The source recorded in cache item i, or None when the item is missing, unreadable or was
    written before items recorded their source."""
    try:
        return json.loads(read_header(item_path(folder, i))[1].get("source", "null"))
    except (OSError, ValueError):
        return None


def encoder_files(model_dir):
    """{file: [size, modification time in ns]} of every file that stage 1 reads from the SD3 folder
    `model_dir` (text encoders, tokenizers, VAE), by path inside it."""
    found = {}
    for sub in sorted(os.listdir(model_dir)):
        if sub.startswith(("text_encoder", "tokenizer", "vae")) and os.path.isdir(os.path.join(model_dir, sub)):
            for root, _, names in os.walk(os.path.join(model_dir, sub)):
                for name in names:
                    st = os.stat(os.path.join(root, name))
                    found[os.path.relpath(os.path.join(root, name), model_dir)] = [st.st_size, st.st_mtime_ns]
    return dict(sorted(found.items()))


def check_settings(folder, settings):
    """Write settings.json into a new cache folder, or refuse a cache made with other settings (one
    made before `encoder_files` was recorded is taken as it was)."""
    path = os.path.join(folder, "settings.json")
    if os.path.isfile(path):
        with open(path) as f:
            made = json.load(f)
        if "encoder_files" in settings and "encoder_files" in made and made["encoder_files"] != settings[
                "encoder_files"]:
            changed = sorted(set(made["encoder_files"]) ^ set(settings["encoder_files"]) | {
                k for k in made["encoder_files"] if made["encoder_files"][k] != settings["encoder_files"].get(k)})
            raise ValueError(f"the cache in {folder} was encoded from other text encoder or VAE files of "
                             f"{settings['model']} ({changed[0]} and {len(changed) - 1} more changed size or time): "
                             f"delete {folder} to encode again, or use another --out")
        for k in sorted((set(made) | set(settings)) - {"encoder_files"}):
            if made.get(k) != settings.get(k):
                raise ValueError(f"the cache in {folder} was made with {k} = {made.get(k)!r} but this run asks "
                                 f"for {settings.get(k)!r}: delete {folder} to encode again, or use another --out")
        return
    os.makedirs(os.path.join(folder, "items"), exist_ok=True)
    text = json.dumps(settings, indent=1).encode()
    atomic_write(path, lambda f: f.write(text))


def encode_items(folder, items, sources, rows, encode_text, vae, resolution, batch_size, progress=None):
    """Encode the items `rows` of `items` [(image path, caption)] whose cached item is missing or
    was made from another source than `sources` (source_of each item), in batches: x0 = the VAE's
    posterior mean in model space (a deterministic cache: Alg. 1 draws its own noise around it),
    tokens and pooled from `encode_text` (a prompt.TextEncoders). Returns the image paths that
    could not be decoded (skipped, not cached)."""
    device = next(vae.parameters()).device
    todo = [i for i in rows if item_source(folder, i) != sources[i]]
    skipped = []
    for k in range(0, len(todo), batch_size):
        ok, images = [], []
        for i in todo[k:k + batch_size]:
            try:
                images.append(load_image(items[i][0], resolution))
                ok.append(i)
            except (OSError, ValueError) as e:
                print(f"warning: skipping {items[i][0]}: cannot decode it ({type(e).__name__}: {e})")
                skipped.append(items[i][0])
        if progress is not None:
            progress.update(len(todo[k:k + batch_size]))
        if not ok:
            continue
        with torch.no_grad():
            x0 = vae.encode(torch.stack(images).to(device, next(vae.parameters()).dtype))  # (b, C, h, w)
            text = encode_text([items[i][1] for i in ok])  # tokens (b, L, D), pooled (b, P)
        for j, i in enumerate(ok):
            save_file({"x0": x0[j].float().contiguous(), "tokens": text.tokens[j].contiguous(),
                       "pooled": text.pooled[j].contiguous()}, item_path(folder, i),
                      metadata={"source": json.dumps(sources[i])})
    return skipped


def write_empty(folder, encode_text):
    """∅ = the encoding of "" (not zeros)."""
    u = encode_text([""])
    save_file({"tokens": u.tokens.contiguous(), "pooled": u.pooled.contiguous()},
              os.path.join(folder, "empty.safetensors"))


def write_index(folder, items, sources, skipped):
    """Mark the cache complete: the rows that hold an item, their captions, the skipped images,
    and the sources of every row (is_current compares them on the next start)."""
    skipped = set(skipped)
    valid = [i for i, (path, _) in enumerate(items) if path not in skipped]
    missing = [i for i in valid if item_source(folder, i) != sources[i]]
    if missing:
        raise RuntimeError(f"{len(missing)} cache items were not written (first: row {missing[0]})")
    # atomically: index.json is the mark of a complete cache, so a half-written one must never exist
    text = json.dumps({"rows": valid, "captions": [items[i][1] for i in valid], "skipped": sorted(skipped),
                       "sources": sources}).encode()
    atomic_write(os.path.join(folder, "index.json"), lambda f: f.write(text))


def is_current(folder, sources):
    """Whether the cache is complete and made from exactly these sources: nothing to encode. (One
    file read; otherwise build compares each item's own record.)"""
    try:
        with open(os.path.join(folder, "index.json")) as f:
            return json.load(f).get("sources") == sources
    except (OSError, ValueError):
        return False


def build(folder, model_dir, data_dir, resolution, t5_length, batch_size, device, rank=0, world=1, items=None):
    """The cache of `data_dir` in `folder`, built once and then read: each of the `world` processes
    encodes every world-th image (rank, rank + world, ...), rank 0 writes ∅ and the index. The
    encoders run in bf16 on a GPU (float32 on a CPU), the VAE in float32 (SD3's config asks to
    upcast it). `items`: the folder's data.list_items, when already listed. Returns CachedData."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    items = list_items(data_dir) if items is None else items
    sources = [source_of(data_dir, path, caption) for path, caption in items]
    settings = {"model": model_dir, "data": data_dir, "resolution": resolution, "encoder_dtype": str(dtype),
                "t5_length": t5_length, "encoder_files": encoder_files(model_dir)}
    if rank == 0:
        check_settings(folder, settings)
    if world > 1:
        dist.barrier()
    if not is_current(folder, sources):
        encoders = TextEncoders.load(model_dir, device, dtype, t5_length=t5_length)
        vae = load_vae(model_dir, device, torch.float32).eval()
        rows = range(rank, len(items), world)
        with tqdm(total=len(rows), desc="stage 1: encoding", disable=rank != 0) as bar:
            skipped = encode_items(folder, items, sources, rows, encoders, vae, resolution, batch_size, bar)
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, skipped)
            skipped = [s for part in gathered for s in part]
        if rank == 0:
            write_empty(folder, encoders)
            write_index(folder, items, sources, skipped)
        del encoders, vae
        if device.type == "cuda":
            torch.cuda.empty_cache()  # hand the encoders' memory back before the models load
        if world > 1:
            dist.barrier()
    return CachedData(folder)


class CachedData:
    """The training set read back from a complete cache: row r of the data set is the r-th item
    that decoded. get(rows) -> x0 (B, C, h, w) float32, Text(tokens (B, L, D), pooled (B, P))."""

    def __init__(self, folder):
        with open(os.path.join(folder, "index.json")) as f:
            index = json.load(f)
        self.folder, self.rows, self.skipped = folder, index["rows"], index["skipped"]
        if not self.rows:
            raise ValueError(f"no image in the data folder could be decoded ({len(self.skipped)} skipped)")

    def __len__(self):
        return len(self.rows)

    def get(self, rows, device):
        items = [load_file(item_path(self.folder, self.rows[r])) for r in rows]
        stack = lambda k: torch.stack([it[k] for it in items]).to(device)
        return stack("x0"), Text(stack("tokens"), stack("pooled"))

    def empty(self, device):
        u = load_file(os.path.join(self.folder, "empty.safetensors"), device)
        return Text(u["tokens"], u["pooled"])


class SyntheticData:
    """Random tensors in the shapes the encoders would give (for --random-init sd3-medium, which
    builds no VAE and no text encoders): row r is drawn from a generator seeded with r, so every
    process sees the same data set. Measures speed and memory; it teaches nothing."""

    def __init__(self, size, channels, resolution, pooled_dim, joint_dim=SD3_JOINT_DIM,
                 text_len=CLIP_LENGTH + SD3_T5_LENGTH, seed=0):
        self.size, self.seed = size, seed
        self.shapes = {"x0": (channels, resolution // 8, resolution // 8), "tokens": (text_len, joint_dim),
                       "pooled": (pooled_dim,)}

    def __len__(self):
        return self.size

    def _draw(self, r, device):
        g = torch.Generator(device).manual_seed(self.seed + r)
        return {k: torch.randn(s, generator=g, device=device) for k, s in self.shapes.items()}

    def get(self, rows, device):
        items = [self._draw(r, device) for r in rows]
        stack = lambda k: torch.stack([it[k] for it in items])
        return stack("x0"), Text(stack("tokens"), stack("pooled"))

    def empty(self, device):
        u = self._draw(-1, device)
        return Text(u["tokens"][None], u["pooled"][None])
