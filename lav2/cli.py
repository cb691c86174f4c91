"""The `lav2` command: a thin layer over library functions. Known errors become one line and exit code 1."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lav2.errors import Lav2Error


class Lav2Group(click.Group):
    """Turns Lav2Error into `error: <message>` on stderr and exit 1; Ctrl-C into exit 130. Never a traceback
    for bad input (bugs still show theirs)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Lav2Error as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=Lav2Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lav2")
def main():
    """Download, fine-tune, merge and chat with LLaMA-Adapter V2 on one GPU."""


@main.command()
@click.argument("source", required=False)
@click.option("--out", type=click.Path(path_type=Path), help="Model folder to write (default: $LAV2_HOME/NAME).")
@click.option("--adapter", help="An official LLaMA-Adapter V2 .pth file (or registry adapter name) to add.")
@click.option("--clip", type=click.Path(path_type=Path), help="Folder with open_clip_config.json and "
              "open_clip_model.safetensors (the CLIP of the adapter).")
@click.option("--token", envvar="HF_TOKEN", help="Hugging Face token for gated repos (default: $HF_TOKEN).")
@click.option("--home", type=click.Path(path_type=Path), envvar="LAV2_HOME",
              help="Where model folders go by default (default: $LAV2_HOME, else ~/.cache/lav2).")
@click.option("--list", "list_models", is_flag=True, help="List the registry names and exit.")
def download(source, out, adapter, clip, token, home, list_models):
    """Make a lav2 model folder from SOURCE: a registry name (7b, 7b-lora, llama-7b ...), a Hugging Face
    repo id, or a local Meta / Hugging Face LLaMA folder."""
    from lav2 import download as dl

    if list_models:
        from rich.console import Console

        Console().print(dl.format_model_table())
        return
    if not source:
        raise Lav2Error("give a SOURCE: a registry name (see `lav2 download --list`), a repo id or a folder")
    folder = dl.download(source, out=out, adapter=adapter, clip=clip, token=token, home=home)
    click.echo(f"model folder ready: {folder}")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set train.steps=100 (repeatable).")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (overrides the recipe's).")
@click.option("--resume", is_flag=True, help="Continue the run in the output folder from its last checkpoint.")
def finetune(recipe, overrides, out, resume):
    """Fine-tune a model as RECIPE (a YAML file) says; writes a lav2 model folder."""
    from lav2 import finetune as ft

    ft.run(recipe, overrides=list(overrides), out=out, resume=resume)


@main.command()
@click.argument("folder", type=click.Path(path_type=Path), default=Path("runs/demo"))
@click.option("--seed", default=0, show_default=True, help="Seed of the images, the tiny model and its tokenizer.")
@click.option("--images", default=2000, show_default=True, help="Training images.")
@click.option("--heldout", default=100, show_default=True, help="Held-out images, for `lav2 eval`.")
@click.option("--clip-steps", default=None, type=click.IntRange(min=0),
              help="Contrastive pretraining steps of the tiny CLIP (default: lav2.demo.CLIP_STEPS; 0: random).")
def demo(folder, seed, images, heldout, clip_steps):
    """Generate the offline demo's base model and data into FOLDER (default runs/demo): what
    recipes/shapes.yaml trains on, made locally in a minute or two (most of it pretraining the tiny CLIP)."""
    from lav2 import demo as demo_data

    steps = demo_data.CLIP_STEPS if clip_steps is None else clip_steps
    demo_data.generate(folder, seed=seed, images=images, heldout=heldout, clip_steps=steps)
    click.echo(f"demo data ready: {folder}; next: lav2 finetune recipes/shapes.yaml")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The merged model folder to write.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="dtype of the saved weights (default: that of the base).")
def merge(run_dir, out, dtype):
    """Fold bias, scale and LoRA of RUN_DIR into its base weights: one self-contained, faster model folder."""
    from lav2 import checkpoint

    folder = checkpoint.merge(run_dir, out=out, dtype=dtype)
    click.echo(f"merged model folder: {folder}")


@main.command(name="eval")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path), help="Model folder.")
@click.option("--task", required=True, metavar="caption|mme|choice|vqa", help="The benchmark's kind.")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="The task's data file (MME: its "
              "release folder).")
@click.option("--image-root", type=click.Path(path_type=Path), help="Folder the data's image names are relative "
              "to (default: the data file's folder).")
@click.option("--out", type=click.Path(path_type=Path), help="Folder for predictions.jsonl and metrics.json; "
              "running again with it resumes (default: eval/MODEL-TASK-DATA).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Questions decoded together.")
@click.option("--limit", type=int, help="Evaluate the first N items only.")
@click.option("--split", help="caption, Karpathy split JSON: the part to evaluate (default: test).")
@click.option("--annotations", type=click.Path(path_type=Path), help="vqa, VQAv2 questions file: its annotations "
              "file (default: found beside it).")
@click.option("--instruction", help="choice, vqa: the line after each question (default: the instruction "
              "LLaVA-style models are trained on; \"\" for none, for a model trained on bare questions).")
@click.option("--device", help="torch device, e.g. cpu, cuda (default: cuda if available).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Weights dtype (default: bfloat16 on CUDA, float32 on CPU).")
def eval_(model_dir, task, data, image_root, out, batch_size, limit, split, annotations, instruction, device, dtype):
    """Answer a benchmark with a model (greedy, batched) and score it as the benchmark does.

    \b
    caption  COCO caption annotations, a Karpathy split JSON or [{image, captions}]: BLEU, METEOR, ROUGE_L, CIDEr
    mme      MME's release folder: acc + acc+ per subtask, perception and cognition totals
    choice   [{question, options, answer (letter or index), image?, category?}]: letter accuracy (ScienceQA)
    vqa      [{image, question, answers}] or VQAv2's questions file: VQAv2 soft accuracy

    Lists are JSON or JSONL files. A killed run started again with the same --out answers only what is left.
    """
    from lav2 import eval as ev

    ev.evaluate(model_dir, task=task, data=data, image_root=image_root,
                out=out or ev.default_out(model_dir, task, data), batch_size=batch_size, limit=limit, split=split,
                annotations=annotations, instruction=instruction, device=device, dtype=dtype)


# the options of the commands that load a model to answer with it: chat and serve
model_option = click.option("--model", "model_dir", type=click.Path(path_type=Path), help="Model folder (default: "
                            "$LAV2_HOME/7b, else ~/.cache/lav2/7b; `lav2 download 7b` makes it).")
device_option = click.option("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available).")
dtype_option = click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
                            help="Weights dtype (default: bfloat16 on CUDA, float32 on CPU).")
quantize_option = click.option("--quantize", type=click.Choice(["int8"]), help="Frozen weights in int8 (one byte "
                               "each): bitsandbytes LLM.int8 on CUDA (needs bitsandbytes); torch's weight-only int8 "
                               "kernel on CPU.")


@main.command()
@model_option
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="Image to talk about (one: the model takes one image per conversation).")
@click.option("--prompt", help="Answer this one prompt, print only the answer and exit (for scripts).")
@device_option
@dtype_option
@quantize_option
@click.option("--expert", "experts", multiple=True, metavar="caption|caption=FILE|ocr", help="Add what an expert "
              "model says about the image to the prompt: a CoCa caption (weights from the hub once, or FILE) or "
              "Tesseract OCR (repeatable).")
@click.option("--temperature", type=float, default=0.1, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=float, default=0.75, show_default=True, help="Nucleus sampling mass.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Keep the k likeliest tokens (0: off).")
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="Longest answer, in tokens.")
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True, help=">1 discourages "
              "tokens already in the context (1: off).")
@click.option("--seed", type=int, help="Seed for reproducible sampling (default: random).")
@click.option("--compile", is_flag=True, help="torch.compile the decode step: the first answer waits for the "
              "compilation (tens of seconds), every later token comes faster.")
def chat(model_dir, images, prompt, device, dtype, quantize, experts, temperature, top_p, top_k, max_new_tokens,
         repetition_penalty, seed, compile):
    """Chat with a model about an image in the terminal; piped input is one turn per line.

    Sampling defaults are the official LLaMA-Adapter V2 release's. In the chat: /image PATH, /reset,
    /save FILE (.json or Markdown), /help, /quit; Ctrl-C stops an answer, Ctrl-D leaves.
    """
    from lav2 import chat as chat_mod
    from lav2.generate import Sampling

    sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                        repetition_penalty=repetition_penalty, seed=seed)
    chat_mod.run(model_dir=model_dir, images=list(images), prompt=prompt, device=device, dtype=dtype,
                 quantize=quantize, experts=list(experts), sampling=sampling, compile=compile)


@main.command()
@model_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 for every interface (then set an API key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: a free port.")
@click.option("--api-key", envvar="LAV2_API_KEY", help="Require `Authorization: Bearer KEY` on /v1 (default: "
              "$LAV2_API_KEY; unset: no key).")
@quantize_option
@click.option("--max-batch", type=click.IntRange(1), default=8, show_default=True,
              help="Most requests decoded together in one batch.")
@click.option("--max-queue", type=click.IntRange(1), default=32, show_default=True,
              help="Most requests waiting for the model; more are answered 503.")
@device_option
@dtype_option
def serve(model_dir, host, port, api_key, quantize, max_batch, max_queue, device, dtype):
    """Serve a model over the OpenAI chat-completions API (POST /v1/chat/completions, GET /v1/models).

    Any OpenAI client works with base_url http://HOST:PORT/v1. Images go in as data URLs; remote URLs are not
    fetched. Ctrl-C stops the server.
    """
    from lav2 import serve as serve_mod

    serve_mod.run(model_dir=model_dir, host=host, port=port, api_key=api_key, device=device, dtype=dtype,
                  quantize=quantize, max_batch=max_batch, max_queue=max_queue)


if __name__ == "__main__":
    main()
