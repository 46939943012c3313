"""Build the HF model on the meta device, swap its linears for cache-backed ones, load the unstreamed
parameters, and wire store -> cache -> prefetcher -> modules. `load()` is the public entry point."""
import atexit
import contextlib
import json
import os
import re
import sys
import threading
from pathlib import Path

import psutil
from jinja2 import TemplateError
from tqdm import tqdm

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PretrainedConfig

from .attention import choose_attention
from .cache import POLICIES, DeviceCache, auto_budget, auto_reserve, device_nbytes, parse_budget
from .compiled import COMPILE_MODES, CompiledDecode, cpu_auto
from .cudart import CudaRuntime
from .errors import OffloadError
from .formats import make_format
from .fusion import fusion_groups, gather_biases, swap_fused
from .host import HostStore, check_ram, entry_shapes, layout
from .modules import (Int8Linear, OffloadedLinear, empty_model, kv_cache, kv_cache_kwarg, linear_modules,
                      swap_host_embedding, swap_int8_linears, swap_linears)
from .prefetch import Prefetcher
from .source import check_no_custom_code, regular_file
from .weights import WeightsDir
from .stream import TextStream
from .timing import PassTimer
from .units import fmt_bytes, parse_size

KV_RESERVE_TOKENS = 4096  # default context the "auto" budget keeps room for (batch 1)


def resolve_device(device) -> torch.device:
    """None -> cuda if available, else cpu; a name or torch.device checked against this machine."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise OffloadError(f"unknown device {device!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OffloadError("device cuda requested but no CUDA GPU is available")
    if device.type not in ("cpu", "cuda"):
        raise OffloadError(f"unsupported device {device} (cpu or cuda)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def set_threads(threads=None) -> int:
    """Set torch's intra-op threads: `threads`, or by default one per physical core. Returns the count."""
    if threads is None:
        threads = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    if int(threads) < 1:
        raise OffloadError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(int(threads))
    return int(threads)


def _peak_rss() -> int | None:
    """The process's peak resident set (Linux; None elsewhere)."""
    if sys.platform.startswith("linux"):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return None


def resolve_dtype(dtype, device) -> torch.dtype:
    """None -> bfloat16 (the fast kernels, on cpu too); a name ("bf16", "float32", ...) or torch.dtype."""
    if dtype is None:  # the fast path on both devices; float32 is the exact reference, on request
        return torch.bfloat16
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if dtype not in names:
            raise OffloadError(f"unknown dtype {dtype!r} (choose from {', '.join(names)})")
        dtype = names[dtype]
    return dtype


class Engine:
    """An offloaded HF causal LM. Use `offload.load(...)` to make one; close it (or use `with`).

    `generate` may be called from several threads: a lock runs one call at a time (the prefetcher
    streams for one sequence of forward passes). Calling `engine.model` directly is not locked.
    """

    def __init__(self, model_dir, weights_dir, *, cache="auto", policy="pin", device=None, dtype=None,
                 cache_format="int4", device_memory=None, ctx_size=None, progress=True, verify=True,
                 emulate_copies=False, fuse=True, compile="auto"):
        self._closed = True
        if compile not in COMPILE_MODES:
            raise OffloadError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        self.compiled, self._compile_option = None, compile
        self._generate_lock = threading.Lock()
        self.device_memory = device_memory
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        # weights_dir may also be an object with WeightsDir's interface (benchmarks' synthetic weights),
        # and model_dir a PretrainedConfig: then there are no side files to read.
        self.weights = weights_dir if hasattr(weights_dir, "iter_read") else WeightsDir(weights_dir, verify)
        if isinstance(model_dir, PretrainedConfig):
            config_dir, self.config = None, model_dir
        else:
            config_dir = Path(model_dir) if model_dir is not None else self.weights.path
            if not (config_dir / "config.json").exists():
                raise OffloadError(f"{config_dir} has no config.json")
            check_no_custom_code(config_dir)
            regular_file(config_dir / "config.json", "config")
            self.config = AutoConfig.from_pretrained(config_dir, trust_remote_code=False)
        self.ctx_size = self._resolve_ctx_size(ctx_size)
        self.fmt = make_format(cache_format, self.weights.block_size, self.device, self.dtype)

        model = empty_model(self.config, self.dtype, choose_attention(self.device, self.dtype))
        self.weights.check_config(model)
        # everything the cache does not stream: embeddings, norms, biases, an int8 or bf16 lm_head
        streamed = self.weights.linears
        unstreamed = {n: t for n, t in self.weights.tensors.items() if n not in streamed}
        check_ram(sum(torch.Size(t.shape).numel() for t in unstreamed.values()) * 4, "the unquantized tensors")
        # The input embedding stays in host RAM (a row gather per step is cheap), the rest goes to the device.
        self._host_embedding = swap_host_embedding(model, self.device)
        unstreamed_bytes = sum(device_nbytes(t, self.dtype, self.weights.block_size)
                               for n, t in unstreamed.items() if n != self._host_embedding)

        side_dirs = [d for d in (config_dir, self.weights.path) if d is not None]
        self.tokenizer = self._load_tokenizer(side_dirs)

        # registration order: usually the execution order, so the plan made now rarely changes
        # once the first forward has recorded the real one; a fused group takes its first part's place
        self.groups = fusion_groups(model, streamed) if fuse else {}
        fused_of = {p: g for g, parts in self.groups.items() for p in parts}
        order = list(dict.fromkeys(fused_of.get(f"{name}.weight", f"{name}.weight") for name in linear_modules(model)
                                   if f"{name}.weight" in streamed))
        self._check_plan(order, cache, policy)
        self.store = HostStore.from_weights(self.weights, order, page_lock=False, progress=progress,
                                            repack=self.fmt if hasattr(self.fmt, "write_host") else None,
                                            groups=self.groups)
        self.cache = self._plan(cache, policy, unstreamed_bytes)
        # cpu: the host buffer is what the compute reads; copying into a "device" slot only emulates a GPU
        self.zero_copy = self.device.type == "cpu" and self.fmt.views_host and not emulate_copies
        self.prefetcher = Prefetcher(self.cache, self.store, self.fmt, self.device, zero_copy=self.zero_copy)
        if self.device.type == "cuda":  # after the plan: a plan that fails leaves nothing registered
            self.store.page_lock(CudaRuntime(self.device))
        self._closed = False
        atexit.register(self.close)  # stop the thread and unpin host memory before the interpreter goes
        try:
            self._finish_load(model, unstreamed, side_dirs, streamed, fused_of, progress)
        except BaseException:
            self.close()  # a failed load leaves no thread and no page-locked memory behind
            raise

    def _finish_load(self, model, unstreamed, side_dirs, streamed, fused_of, progress) -> None:
        swap_linears(model, [k for k in streamed if k not in fused_of], self.prefetcher)
        self.fused_products = swap_fused(model, self.groups, self.prefetcher)
        swap_int8_linears(model, [n for n, t in unstreamed.items() if getattr(t, "quant", None) == "int8"],
                          self.weights.block_size)
        self._load_unstreamed(model, unstreamed)
        gather_biases(model, self.fused_products)
        model.eval()
        gen_dir = next((d for d in side_dirs if (d / "generation_config.json").exists()), None)
        if gen_dir is not None:
            model.generation_config = GenerationConfig.from_pretrained(gen_dir)
        self.model = model
        self._unstreamed_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.timer = PassTimer(model, self.device, before=self._before_pass, after=self._after_pass)
        self.prefetcher.attach(model)  # after the timer's hooks: the first pass's planning is not timed
        if self.device.type == "cuda":
            self.warm_up(progress)
        if self._compile_option == "auto" and self.device.type == "cpu":
            # faster on some cpus, slower on others: measured once per cpu and model (offload/compiled.py)
            self.compiled = cpu_auto(self, progress) if self.zero_copy else None
        elif self._compile_wanted(self._compile_option):
            self.compiled = CompiledDecode(self, progress)
            self.compiled.install()
        self.reset_stats()

    def _compile_wanted(self, option) -> bool:
        """compile=True: always; "auto" on cuda: where this GPU's last offload-check measured it faster."""
        if option != "auto":
            return bool(option)
        if self.device.type != "cuda":
            return False
        from .check import last_check
        compiled = (last_check(self.device) or {}).get("compiled") or {}
        return bool(compiled.get("ok") and compiled.get("faster"))

    @torch.inference_mode()
    def warm_up(self, progress=True) -> int:
        """Run the decode kernel once per streamed shape (M = 1, on zero weights outside the cache) so
        that compiling it never lands in the first reply. -> the number of shapes run."""
        shapes = {}  # (N, K, has bias) -> (entry, bias)
        users = [(m.key, m.bias) for m in self.model.modules() if isinstance(m, OffloadedLinear)]
        users += [(p.key, p.bias) for p in self.fused_products]
        for key, bias in users:
            entry = self.store.entries[key]
            shapes.setdefault((*entry.shape, bias is not None), (entry, bias))
        for entry, bias in tqdm(shapes.values(), desc="warming up the decode kernels", unit="shape",
                                disable=not progress):
            raw = torch.zeros(entry.nbytes, dtype=torch.uint8, device=self.device)
            x = torch.zeros(1, entry.shape[1], dtype=self.dtype, device=self.device)  # [1, K]
            self.fmt.linear(x, self.fmt.materialize(raw, entry), bias)
            del raw
        for module in self.model.modules():  # the resident int8 output projection's decode kernel
            if isinstance(module, Int8Linear):
                module(torch.zeros(1, module.in_features, dtype=self.dtype, device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        return len(shapes)

    def _resolve_ctx_size(self, ctx_size) -> int:
        """The longest context (prompt + reply) the budget leaves KV room for: at most the model's."""
        limit = getattr(self.config, "max_position_embeddings", None)
        if ctx_size is None:
            return min(KV_RESERVE_TOKENS, limit) if limit else KV_RESERVE_TOKENS
        if int(ctx_size) < 1:
            raise OffloadError(f"ctx_size must be at least 1, got {ctx_size}")
        if limit and ctx_size > limit:
            raise OffloadError(f"ctx_size {ctx_size} is longer than the model's context ({limit} tokens)")
        return int(ctx_size)

    def _load_tokenizer(self, side_dirs):
        # Synthetic and test models may come without one: token ids still work through engine.model.
        tok_dir = next((d for d in side_dirs[::-1] if (d / "tokenizer_config.json").exists()), None)
        if tok_dir is None:
            return None
        check_no_custom_code(tok_dir)
        tok_json = tok_dir / "tokenizer.json"
        if tok_json.exists():
            try:
                json.loads(regular_file(tok_json, "tokenizer file").read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise OffloadError(f"tokenizer file {tok_json} is corrupt ({type(e).__name__})") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise OffloadError(f"cannot load the tokenizer in {tok_dir}: {str(e).splitlines()[0] if str(e) else e!r}") from e
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # decoder-only batches pad on the left
        return tokenizer

    def _check_plan(self, order, cache, policy) -> None:
        """Policy and budget from the manifest's shapes, before the host store is filled (minutes
        on a large model): a budget smaller than one entry fails here, not after the load."""
        if policy not in POLICIES:
            raise OffloadError(f"unknown cache policy {policy!r} (choose from {', '.join(POLICIES)})")
        if str(cache).strip() == "auto":
            return  # sized from free device memory once the rest is loaded
        shapes = entry_shapes(self.weights.tensors, order, self.groups)
        entries, _ = layout(shapes, self.weights.block_size, getattr(self.fmt, "host_nbytes", None)
                            if hasattr(self.fmt, "write_host") else None)
        sizes = {k: self.fmt.slot_nbytes(e) for k, e in entries.items()}
        DeviceCache(sizes, parse_budget(cache, sizes), policy)

    def _plan(self, cache, policy, unstreamed_bytes: int) -> DeviceCache:
        """The device cache for `cache`/`policy`; unstreamed_bytes: what is still to be loaded on the
        device besides the cache."""
        sizes = {k: self.fmt.slot_nbytes(e) for k, e in self.store.entries.items()}
        auto = self._auto_budget(sizes, unstreamed_bytes) if self.device.type == "cuda" else None
        plan = DeviceCache(sizes, parse_budget(cache, sizes, auto), policy)
        self._plan_args = (cache, policy)
        return plan

    def replan(self, cache="auto", policy="pin") -> None:
        """Change the cache budget and policy in place, keeping the host store and the loaded model
        (a sweep over cache sizes loads once). The next forward records the layer order again."""
        if self._closed:
            raise OffloadError("the engine is closed")
        old = self._plan_args
        self.prefetcher.close()  # frees every slot
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # so that an "auto" budget sees the freed memory
        try:
            plan = self._plan(cache, policy, 0)  # the unstreamed tensors are on the device already
        except OffloadError:
            self.cache = self._plan(*old, 0)
            self.prefetcher.restart(self.cache)
            raise
        self.cache = plan
        self.prefetcher.restart(plan)
        if self.compiled is not None:
            self.compiled.restart()  # new slots: the next all-bound step compiles again
        self.reset_stats()

    def _auto_budget(self, sizes, unstreamed_bytes: int) -> int:
        free, _total = torch.cuda.mem_get_info(self.device)
        if self.device_memory is not None:  # an emulated smaller card
            free = min(free, self.device_memory - torch.cuda.memory_reserved(self.device))
        reserve = auto_reserve(self.config, self.dtype, self.ctx_size, unstreamed_bytes,
                               [e.shape for e in self.store.entries.values()])
        return auto_budget(free, reserve, sizes)

    def _load_unstreamed(self, model, unstreamed) -> None:
        state = {}
        for name, tensors in self.weights.iter_read(unstreamed):
            if name == self._host_embedding:
                model.get_input_embeddings().table = tensors[0].to(self.dtype)  # [V, D], stays on the cpu
                continue
            for key, tensor in zip(self.weights.tensors[name].keys, tensors):  # int8: qweight + scales
                state[key] = tensor.to(self.device, self.dtype if tensor.is_floating_point() else tensor.dtype)
        model.load_state_dict(state, strict=False, assign=True)
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if p.is_meta:
                raise OffloadError(f"{self.weights.path} has no tensor for {name} (manifest does not match the config)")
        if self._host_embedding is not None and model.get_input_embeddings().table is None:
            raise OffloadError(f"{self.weights.path} has no tensor for {self._host_embedding} "
                               "(manifest does not match the config)")
        model.to(self.device)  # buffers built on the host (rotary tables)

    # ---- stats ----
    def reset_stats(self) -> None:
        """Zero the timing and traffic counters and the device's peak-memory mark (the cache keeps what it holds)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.timer.reset()
        self._h2d = {"prefill": 0, "decode": 0}  # bytes copied in during each phase's passes
        self._counters0 = (self.cache.hits + self.prefetcher.bound_uses, self.cache.misses)

    def _before_pass(self, phase: str) -> None:
        self._h2d0 = self.cache.h2d_bytes

    def _after_pass(self, phase: str) -> None:
        self._h2d[phase] += self.cache.h2d_bytes - self._h2d0

    @property
    def stats(self) -> dict:
        """Throughput, cache traffic and memory since load (or `reset_stats`)."""
        t = self.timer.stats()
        dt = t["decode_tokens"]
        pb, db = self._h2d["prefill"], self._h2d["decode"]
        hits = self.cache.hits + self.prefetcher.bound_uses - self._counters0[0]
        misses = self.cache.misses - self._counters0[1]
        cuda = self.device.type == "cuda"
        entries = self.store.entries
        rss = psutil.Process().memory_info().rss
        return {
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "policy": self.cache.policy, "cache_format": self.fmt.name, "cache_spec": self.cache.budget.spec,
            **{k: v for k, v in t.items() if k != "peak_device_bytes"},
            "h2d_bytes_per_token": db / dt if dt else 0.0, "h2d_bytes": pb + db,
            "cache_hits": hits, "cache_misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
            "prefetch_waits": self.prefetcher.waits,
            "cache_budget_bytes": self.cache.budget_bytes,
            "cache_budget_entries": self.cache.budget.limit if self.cache.budget.unit == "entries" else None,
            "resident_bytes": self.cache.resident_bytes, "pinned_bytes": self.cache.pinned_bytes,
            "streamed_bytes_per_token": sum(e.nbytes for k, e in entries.items() if k not in self.cache.pinned)
            if self.cache.policy == "pin" and not self.zero_copy else 0 if self.zero_copy else None,
            "model_bytes": sum(e.nbytes for e in entries.values()), "host_bytes": self.store.nbytes,
            "cache_model_bytes": self.cache.model_bytes,  # the whole model in the cache format's bytes
            "host_page_locked": self.store.page_locked, "host_copy": self.store.copy_mode,
            "peak_device_bytes": torch.cuda.max_memory_allocated(self.device) if cuda
            else self.cache.peak_bytes + self._unstreamed_bytes,
            "rss_bytes": rss, "peak_rss_bytes": max(rss, _peak_rss() or 0),
            "threads": torch.get_num_threads(), "ctx_size": self.ctx_size, "zero_copy": self.zero_copy,
            "compiled": self.compiled is not None,
            "compile_seconds": self.compiled.compile_seconds if self.compiled is not None else 0.0,
        }

    def memory_plan(self) -> str:
        """One line: budget, resident bytes, streamed bytes per token."""
        s = self.stats
        if self.zero_copy:
            return (f"memory plan: zero-copy on cpu: the {fmt_bytes(s['model_bytes'])} of int4 weights are read in "
                    f"place from host RAM (the cache budget applies to GPUs, or with --emulate-copies); "
                    f"{self.device} {str(self.dtype).removeprefix('torch.')}")
        streamed = s["streamed_bytes_per_token"]
        streamed = f"streamed {fmt_bytes(streamed)}/token" if streamed is not None else "streamed: up to the model/token"
        return (f"memory plan: {self.cache.plan_line()}, {streamed}; model {fmt_bytes(s['model_bytes'])} int4 in "
                f"{fmt_bytes(self.store.nbytes)} of {self._host_words()}host RAM"
                f"{', input embedding too' if self._host_embedding else ''}; "
                f"{self.device} {str(self.dtype).removeprefix('torch.')}")

    def _host_words(self) -> str:
        return {"page_locked": "page-locked ", "bounce": "pageable (bounce-buffered) "}.get(self.store.copy_mode, "")

    # ---- generation ----
    def encode(self, prompts, chat=False):
        """Tokenize prompt(s), left-padded, on the device. A prompt is a string (through the chat template
        with `chat=True`) or a chat: a list of {"role", "content"} dicts, always through the template."""
        if self.tokenizer is None:
            raise OffloadError(f"{self.weights.path} has no tokenizer files: pass token ids to engine.model.generate")
        batch = [prompts] if _is_single(prompts) else list(prompts)
        if not batch:
            raise OffloadError("no prompt given")
        chats = [[{"role": "user", "content": p}] if isinstance(p, str) and chat else _check_chat(p) for p in batch]
        if any(c is None for c in chats) and any(c is not None for c in chats):
            raise OffloadError("a batch mixes chats and plain prompts: pass chat=True or one kind only")
        if chats[0] is None:
            return self.tokenizer(batch, return_tensors="pt", padding=True).to(self.device)
        if not getattr(self.tokenizer, "chat_template", None):
            raise OffloadError("this tokenizer has no chat template: pass plain prompts")
        try:
            texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        except (TemplateError, ValueError, TypeError, KeyError) as e:  # the template's own checks (roles it refuses)
            raise OffloadError(f"the chat template refused the messages: {e}") from e
        return self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)

    def generate(self, prompts, max_new_tokens=128, chat=False, stream=False, **generate_kwargs):
        """Generate a reply to a prompt or a chat (-> str) or to a list of them (-> list[str], batched).

        A chat is a list of {"role", "content"} dicts (any roles the chat template takes) and goes through
        the template; a string does with `chat=True`. Extra keyword arguments go to the HF `generate`
        (do_sample, temperature, stop_strings, ...); without them decoding is greedy. `stream=True` (one
        prompt or chat) returns a `TextStream`: iterate it for the text pieces as they come.
        """
        if self._closed:
            raise OffloadError("the engine is closed")
        if stream and not _is_single(prompts):
            raise OffloadError("stream=True takes one prompt or chat, not a batch")
        enc = self.encode(prompts, chat)
        context = getattr(self.config, "max_position_embeddings", None)
        if context is not None and enc["input_ids"].shape[1] + max_new_tokens > context:
            raise OffloadError(f"the prompt ({enc['input_ids'].shape[1]} tokens) + {max_new_tokens} new tokens is "
                               f"longer than the model's context ({context} tokens)")
        generate_kwargs.setdefault("do_sample", False)
        if not generate_kwargs["do_sample"]:
            generate_kwargs.setdefault("temperature", None)
            generate_kwargs.setdefault("top_p", None)
            generate_kwargs.setdefault("top_k", None)
        generate_kwargs.setdefault("tokenizer", self.tokenizer)  # for stop_strings
        kwargs = {**enc, "max_new_tokens": max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id,
                  **generate_kwargs}
        if stream:
            return TextStream(self._generate_locked, kwargs, self.tokenizer)
        out = self._generate_locked(kwargs)
        texts = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return texts[0] if _is_single(prompts) else texts

    def add_static_cache(self, kwargs: dict) -> dict:
        """With the compiled decode step: HF generate `kwargs` get the engine's static KV cache (what makes
        HF call the compiled step) unless they bring a cache or disable compiling. -> kwargs.
        Call it under torch.inference_mode(), as generate runs: the cache is reset in place."""
        if self.compiled is None or kv_cache(kwargs) is not None or kwargs.get("disable_compile"):
            return kwargs
        ids = kwargs["input_ids"]  # [B, T]
        kwargs[kv_cache_kwarg(self.model)] = self.compiled.static_cache(ids.shape[0], ids.shape[1] + kwargs["max_new_tokens"])
        return kwargs

    def _generate_locked(self, kwargs):
        with self._generate_lock, torch.inference_mode(), self.memory_errors():
            if self._closed:
                raise OffloadError("the engine is closed")
            return self.model.generate(**self.add_static_cache(dict(kwargs)))

    @contextlib.contextmanager
    def memory_errors(self):
        """A device out-of-memory error inside (in a forward pass or the prefetch thread) becomes one
        OffloadError line that suggests a cache budget smaller by at least what failed to allocate.
        The engine stays usable: `replan` with a smaller budget (a failed prefetch thread is replaced)."""
        try:
            yield
        except (torch.OutOfMemoryError, OffloadError) as e:
            oom = e if isinstance(e, torch.OutOfMemoryError) else e.__cause__
            if not isinstance(oom, torch.OutOfMemoryError):
                raise
            where = "in the prefetch thread" if oom is self.prefetcher.error else "in a forward pass"
            budget = self.cache.budget_bytes
            tried = re.search(r"[Tt]ried to allocate ([0-9.]+ ?[KMGT]?i?B)", str(oom))
            short = parse_size(tried.group(1)) if tried else budget // 10
            smallest = max(self.cache.sizes.values())
            suggest = max(budget - short, smallest)
            spec = f"{suggest >> 20}MiB" if suggest >= 1 << 21 else f"{suggest}B"
            raise OffloadError(f"out of device memory {where} with a cache of {fmt_bytes(budget)}: use a cache "
                               f"smaller by at least the {fmt_bytes(short)} that failed, e.g. --cache {spec} "
                               f"(engine.replan(\"{spec}\"))") from e

    def close(self) -> None:
        """Stop the prefetch thread and free device and page-locked host memory."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self.compiled is not None:
            self.compiled.uninstall()
        self.prefetcher.close()
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()



def _is_single(prompts) -> bool:
    """A string or one chat (a list of message dicts), as opposed to a batch of them."""
    return isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and bool(prompts)
                                        and isinstance(prompts[0], dict))


def _check_chat(messages):
    """A chat as a list of message dicts; None for a plain string prompt."""
    if isinstance(messages, str):
        return None
    if not isinstance(messages, (list, tuple)) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages):
        raise OffloadError("a chat is a non-empty list of {'role': ..., 'content': ...} dicts")
    return list(messages)


def load(model_dir, weights_dir, *, cache="auto", policy="pin", device=None, dtype=None, cache_format="int4",
         device_memory=None, threads=None, ctx_size=None, progress=True, verify=True, emulate_copies=False,
         fuse=True, compile="auto") -> Engine:
    """Load an offloaded model.

    model_dir: the HF model dir (config; may be None: the weights dir carries a copy).
    weights_dir: made by `offload-quantize`.
    cache: "auto" | "full" | entries (int) | size ("12GiB", "500MiB", "65536B") | share ("25%").
    policy: "pin" (fixed resident set + streaming ring) or "lru".
    device: None = cuda if available else cpu.
    dtype: None = bfloat16 (the fast kernels, on cpu too); torch.float32 is the exact reference path.
    cache_format: what the device cache holds ("int4" or "bf16").
    device_memory: bytes the "auto" budget may plan for (emulate a smaller card); None = all free memory.
    threads: torch's intra-op threads, set for the whole process; None = one per physical core.
    ctx_size: the longest context (prompt + reply) the "auto" budget leaves KV-cache room for;
    None = 4096 tokens or the model's context if shorter.
    verify: check each shard's sha256 while it is read (False skips it).
    emulate_copies: on cpu, copy each matrix into a cache slot of the budget as a GPU would (tests, sweeps);
    by default the cpu computes from the host buffer in place (zero-copy: the budget does not apply).
    fuse: one int4 matrix (one product) for q/k/v and one for gate/up (Llama, Mistral, Qwen2, Gemma families).
    compile: True = each decode step of an all-resident plan runs as one compiled graph (torch.compile;
    a CUDA graph on cuda), False = eager, "auto" = where it measured faster. Prefill and streamed plans
    stay eager; `generate` supplies the static KV cache the compiled step needs.
    """
    set_threads(threads)
    return Engine(model_dir, weights_dir, cache=cache, policy=policy, device=device, dtype=dtype,
                  cache_format=cache_format, device_memory=device_memory, ctx_size=ctx_size, progress=progress,
                  verify=verify, emulate_copies=emulate_copies, fuse=fuse, compile=compile)
