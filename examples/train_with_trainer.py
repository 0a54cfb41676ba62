"""Fine-tune a small Llama with MoS through Hugging Face's Trainer, save the adapter, load it back
onto a fresh base, and generate with it.

    python examples/train_with_trainer.py            # 120 steps
    python examples/train_with_trainer.py --small    # 6 steps (CI)

The data is synthetic (no download): every sequence counts upwards in steps of 3, so after the
full run the adapter continues the prompt 0, 3, ..., 15 with 18, 21, 24, ...
"""
import argparse
import tempfile

import torch
import transformers

import mos


class CountingData(torch.utils.data.Dataset):
    """Sequences start, start + 3, start + 6, ... (mod the vocabulary), as causal-LM examples."""

    def __init__(self, n, length=16, vocab=128):
        self.n, self.length, self.vocab = n, length, vocab

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        ids = (torch.arange(self.length) * 3 + i) % self.vocab
        return {"input_ids": ids, "labels": ids.clone()}


def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a few steps (CI)")
    args = parser.parse_args(argv)
    steps = 6 if args.small else 120

    model = mos.get_mos_model(llama(), mos.MoSConfig(r=4, equivalent_rank=2, target_modules="all-linear"))
    model.print_trainable_parameters()
    with tempfile.TemporaryDirectory() as out:
        training = transformers.TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-2,
            logging_steps=max(steps // 4, 1), save_strategy="no", report_to=[], use_cpu=True)
        trainer = transformers.Trainer(model=model, args=training, train_dataset=CountingData(256))
        result = trainer.train()
        print(f"trained {result.global_step} steps, final training loss {result.training_loss:.3f}")

        model.save_pretrained(f"{out}/adapter")
        loaded = mos.MoSModel.from_pretrained(llama(), f"{out}/adapter").eval()

    model.eval()
    prompt = torch.tensor([[0, 3, 6, 9, 12, 15]])
    with torch.no_grad():
        same = torch.equal(model(prompt).logits, loaded(prompt).logits)
        tokens = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                 do_sample=False)
    print(f"reloaded adapter gives the trained model's logits: {same}")
    print(f"prompt {prompt[0].tolist()} -> {tokens[0, prompt.shape[1]:].tolist()}")
    assert same, "the reloaded adapter differs from the trained one"


if __name__ == "__main__":
    main()
