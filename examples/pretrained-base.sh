#!/usr/bin/env bash
# A newcomer's path with the command line alone: a pretrained base (MiniLM, a BertModel without a head),
# two classifiers fine-tuned from it by `gradmatch train`, their Fishers, and merges from the base by
# gradient matching (H_0: the isotropic prior) and by task arithmetic at the same α, each scored on both
# tasks' held-out data. Results: docs/merge.md, "Merging from a pretrained base".
#
#   bash examples/pretrained-base.sh DATA WORK     # DATA: <root>/<preset>/<split>.jsonl (sst2, amazon_polarity)
set -euo pipefail
data=${1:?usage: pretrained-base.sh DATA WORK}
work=${2:?usage: pretrained-base.sh DATA WORK}
mkdir -p "$work" && cd "$work"

# Two children of the pretrained base, one seed: their new heads start from the same values (head_init/).
cat > sst2.yaml <<YAML
model_name_or_path: minilm
dataset_name: sst2
dataset_train_split: "train[:1000]"
output_dir: sst2
num_train_epochs: 1
learning_rate: 1.0e-4
per_device_train_batch_size: 16
max_input_length: 64
seed: 0
YAML
cat > amazon.yaml <<YAML
model_name_or_path: minilm
dataset_name: amazon_polarity
dataset_train_split: "train[:1000]"
output_dir: amazon
num_train_epochs: 1
learning_rate: 1.0e-4
per_device_train_batch_size: 16
max_input_length: 128
seed: 0
YAML
gradmatch train sst2.yaml --data-dir "$data" -q
gradmatch train amazon.yaml --data-dir "$data" -q
gradmatch fisher --model sst2 --data sst2 --split "train[:1000]" --max-examples 200 --max-length 64 \
    --out sst2-fisher --data-dir "$data" -q
gradmatch fisher --model amazon --data amazon_polarity --split "train[:1000]" --max-examples 200 --max-length 128 \
    --out amazon-fisher --data-dir "$data" -q

for alpha in 0.5 1.0; do
  cat > gm-$alpha.yaml <<YAML
method: gradient_matching
base: minilm                  # the pretrained body: its BertModel names are matched to the children's
base_hessian: prior           # H_0 = N_0·c·I; N_t from each child's training_metadata.json
models:
  - {model: sst2, hessian: sst2-fisher, weight: $alpha}
  - {model: amazon, hessian: amazon-fisher, weight: $alpha}
YAML
  cat > ta-$alpha.yaml <<YAML
method: task_arithmetic
base: minilm
models:
  - {model: sst2, weight: $alpha}
  - {model: amazon, weight: $alpha}
YAML
  gradmatch merge gm-$alpha.yaml gm-$alpha -q
  gradmatch merge ta-$alpha.yaml ta-$alpha -q
done

for model in sst2 amazon gm-0.5 ta-0.5 gm-1.0 ta-1.0; do
  for task in "sst2 test" "amazon_polarity test[:500]"; do
    set -- $task
    cat > eval.yaml <<YAML
model_name_or_path: $model
dataset_name: $1
dataset_test_split: "$2"
per_device_eval_batch_size: 64
max_input_length: 128
metric_output_file: results/$model.$1.json
prediction_output_file: results/$model.$1.predictions.json
YAML
    gradmatch evaluate eval.yaml --data-dir "$data" -q
  done
done

python3 - <<'PY'
import json
rows = ["sst2", "amazon", "ta-0.5", "gm-0.5", "ta-1.0", "gm-1.0"]
print(f"{'model':8} {'sst2':>7} {'amazon':>7} {'mean':>7}")
for m in rows:
    acc = [json.load(open(f"results/{m}.{t}.json"))["accuracy"] for t in ("sst2", "amazon_polarity")]
    print(f"{m:8} {acc[0]:7.3f} {acc[1]:7.3f} {sum(acc) / 2:7.3f}")
PY
