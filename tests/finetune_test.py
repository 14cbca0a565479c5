"""Fine-tuning and downstream evaluation: tasks/finetuning.py, scaling_arch/evaluate.py, downstream.py and
gin/runs/finetune*.gin / eval.gin.

Offline throughout: GLUE, SuperGLUE and SQuAD come from `tfds.testing.mock_data` (random examples shaped
like the real ones, generated from the dataset's code: no metadata files needed), which has no split
sizes, so the tests also give seqio's TFDS loader a size (the mixing rates read it). Runs go through
`train.run(argv, entry)` in this process on 4 devices with train_test's tiny geometry, sharing its
persistent compilation cache fixture.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
from unittest import mock

import jax
import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds
from absl import flags

import tasks
from scaling_arch import checkpoints as checkpoints_lib
from scaling_arch import downstream, errors, gin_utils
from scaling_arch import evaluate as evaluate_lib
from scaling_arch import train as train_lib
from tasks import finetuning
from train_test import (IN_PROCESS_DEVICES, TINY, _partitioner, assert_one_clean_error,  # noqa: F401
                        compilation_cache, model_dir_flag, read_json, read_jsonl)

FLAGS = flags.FLAGS
LENGTHS = {'inputs': 64, 'targets': 16}
MOCK_EXAMPLES = 8
EVAL_TASKS = sorted(t for t in finetuning.task_names() if t != 'sa_glue_mnli')  # 19 with metrics
GEOMETRY = [a for a in TINY if not a.startswith('--gin_file')]  # the tiny model and run settings
FINETUNE_LOCAL = ['--gin_file=gin/models/vanilla.gin', '--gin_file=gin/sizes/tiny.gin',
                  '--gin_file=gin/runs/finetune_local.gin']


@contextlib.contextmanager
def mock_tfds(num_examples: int = MOCK_EXAMPLES):
  """TFDS datasets replaced by random examples generated from their code, with a split size. The mock
  reads through a Python generator, whose position tf.data cannot save, so checkpoints made meanwhile
  keep no input position (a real TFDS reader's is saved)."""
  save = checkpoints_lib.Checkpointer.save
  with tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE), \
       mock.patch.object(seqio.utils.LazyTfdsLoader, 'size', lambda self, split: num_examples), \
       mock.patch.object(checkpoints_lib.Checkpointer, 'save',
                         lambda self, step, state, data_iterator=None, **kw: save(self, step, state, **kw)):
    yield


def run(args, capfd=None, entry=train_lib.train):
  """The entry point as the CLI runs it (flags -> gin -> entry -> exit status), on 4 devices."""
  if capfd is not None:
    capfd.readouterr()
  entry = functools.partial(entry, partitioner_factory=functools.partial(_partitioner, IN_PROCESS_DEVICES))
  FLAGS.unparse_flags()
  FLAGS(['scaling_arch', *gin_utils.rewrite_gin_args(list(args))])
  try:
    status = train_lib.run([], entry)
  finally:
    FLAGS.unparse_flags()
  out, err = capfd.readouterr() if capfd is not None else ('', '')
  return status, out, err


@pytest.fixture(scope='module')
def vocab():
  return tasks.get_vocabulary(None, offline_vocab_size=4000)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory, compilation_cache):
  """A tiny vanilla model pretrained for 2 steps on the offline corpus: its step directory."""
  del compilation_cache
  model_dir = tmp_path_factory.mktemp('pretrain') / 'run'
  status, _, _ = run(TINY + [model_dir_flag(model_dir), '--gin.TRAIN_STEPS=2'])
  assert status == 0
  return str(model_dir / 'checkpoints' / '2')


# ---- tasks ------------------------------------------------------------------------------------------------
def test_tasks_register_once_per_vocabulary_and_data_dir(vocab, tmp_path):
  mixture = tasks.get_task(finetuning.MIXTURE, vocabulary=vocab, tfds_data_dir=str(tmp_path))
  assert isinstance(mixture, seqio.Mixture) and mixture.name.startswith(finetuning.MIXTURE + '_')
  names = sorted(finetuning.base_name(t.name) for t in mixture.tasks)
  assert names == sorted(finetuning.task_names()) and len(names) == 20
  assert tasks.get_task(finetuning.MIXTURE, vocabulary=vocab, tfds_data_dir=str(tmp_path)) is mixture
  assert tasks.get_task('sa_glue_cola', vocabulary=vocab, tfds_data_dir='/x').name != \
      tasks.get_task('sa_glue_cola', vocabulary=vocab, tfds_data_dir=str(tmp_path)).name
  with pytest.raises(errors.DataError, match='c4_span_corruption, offline_span_corruption, sa_glue_super'):
    tasks.get_task('sa_glue_nonsense', vocabulary=vocab)
  suffix = mixture.name[-8:]
  eval_only = [t for t in finetuning.task_names() if 'train' not in seqio.get_mixture_or_task(f'{t}_{suffix}').splits]
  assert eval_only == ['sa_glue_mnli_matched', 'sa_glue_mnli_mismatched']
  assert all(mixture.get_rate(seqio.get_mixture_or_task(f'{t}_{suffix}')) == 0.0 for t in eval_only)


def test_every_task_and_the_mixture_through_seqio_and_perfect_predictions_score_100(vocab, tmp_path):
  """Mock TFDS data through t5's preprocessors and seqio's EncDecFeatureConverter: each evaluation
  task's validation split (seqio.Evaluator, as inference evaluation reads it), each training task's
  train split, and the mixture's packed training batches. Predicting each example's own target tokens
  scores 100 on every metric of every task, through t5's postprocessors: a downstream score of 100."""
  mixture = tasks.get_task(finetuning.MIXTURE, vocabulary=vocab, tfds_data_dir=str(tmp_path))
  lengths = {'inputs': 64, 'targets': 64}  # long enough for the random mock answers: no truncation
  expected_prefix = {'sa_squad': 'question:', 'sa_super_glue_record': 'record query:',
                     'sa_super_glue_wsc': 'wsc text:', 'sa_glue_mnli_matched': 'mnli ',
                     'sa_glue_mnli_mismatched': 'mnli '}
  with mock_tfds():
    evaluator = seqio.Evaluator(mixture.name, feature_converter=seqio.EncDecFeatureConverter(pack=False),
                                eval_split='validation', sequence_length=lengths, num_examples=MOCK_EXAMPLES,
                                async_compute_metrics=False)
    assert sorted(finetuning.base_name(t.name) for t in evaluator.eval_tasks) == EVAL_TASKS
    for task in evaluator.eval_tasks:
      name = finetuning.base_name(task.name)
      examples = list(evaluator.cached_model_datasets[task.name].as_numpy_iterator())
      assert len(examples) == MOCK_EXAMPLES, name
      _, features = examples[0]
      assert features['encoder_input_tokens'].shape == (64,) and features['decoder_target_tokens'].shape == (64,)
      assert (features['decoder_target_tokens'] == vocab.eos_id).sum() == 1, name
      text = next(evaluator.cached_task_datasets[task.name].as_numpy_iterator())['inputs_pretokenized'].decode()
      assert text.startswith(expected_prefix.get(name, name.split('_')[-1] + ' ')), (name, text)  # t5's format
    oracle = lambda ds: [(i, ex['decoder_target_tokens']) for i, ex in ds.as_numpy_iterator()]
    with np.errstate(all='ignore'):
      results = evaluator.evaluate(compute_metrics=True, predict_fn=oracle)[0].result()
    task_metrics = {finetuning.base_name(k): v for k, v in results.items()}
    for name, values in task_metrics.items():
      assert values and all(v == pytest.approx(100.0) for v in values.values()), (name, values)
    assert downstream.downstream_score(task_metrics)['downstream_score'] == pytest.approx(100.0)

    for task in mixture.tasks:
      if 'train' in task.splits:
        example = next(task.get_dataset(LENGTHS, split='train', shuffle=False, try_in_mem_cache=False)
                       .as_numpy_iterator())
        assert example['inputs'].size > 1 and example['targets'][-1] == vocab.eos_id, task.name
    batch = next(tasks.get_dataset(mixture, split='train', feature_lengths=LENGTHS, global_batch_size=4, seed=0,
                                   shuffle=False, repeat=True).as_numpy_iterator())
    assert batch['decoder_target_tokens'].shape == (4, 16) and batch['decoder_loss_weights'].sum() > 4


def test_mixing_rates_are_example_proportional_with_a_cap(vocab, tmp_path):
  import gin
  mixture = tasks.get_task(finetuning.MIXTURE, vocabulary=vocab, tfds_data_dir=str(tmp_path))
  cola = next(t for t in mixture.tasks if finetuning.base_name(t.name) == 'sa_glue_cola')
  sizes = {'train': 8551}
  with mock.patch.object(seqio.utils.LazyTfdsLoader, 'size', lambda self, split: sizes[split]):
    assert mixture.get_rate(cola) == 8551
    gin.bind_parameter('finetuning_rate.maximum', 1000)
    assert mixture.get_rate(cola) == 1000
  assert finetuning.DEFAULT_RATE_MAXIMUM == 2**19


def test_missing_tfds_dataset_is_a_data_error(vocab, tmp_path):
  mixture = tasks.get_task(finetuning.MIXTURE, vocabulary=vocab, tfds_data_dir=str(tmp_path))
  with pytest.raises(errors.DataError, match='is not available in data dir .*tfds build'):
    with mock.patch.object(seqio.utils.LazyTfdsLoader, 'size', lambda self, split: 10):
      tasks.get_dataset(mixture, split='train', feature_lengths=LENGTHS, global_batch_size=4, seed=0,
                        shuffle=False, repeat=True)
  assert os.listdir(tmp_path) == []


# ---- the downstream score ----------------------------------------------------------------------------
def metrics_of(task_name, vocab, targets, predictions):
  """The registered task's own metric functions on (postprocessed) targets and predictions."""
  task = tasks.get_task(task_name, vocabulary=vocab, tfds_data_dir='/unused')
  out = {}
  for fn in task.metric_fns:
    out.update(fn(targets, predictions))
  return out


# Hand-made (targets, perfect predictions, wrong predictions, the wrong predictions' task score).
CLASSES = [0, 1, 0, 1]
MULTIRC_T = [{'value': 1, 'group': 0}, {'value': 0, 'group': 0}, {'value': 1, 'group': 1}]
RECORD_T = [{'value': ['a b'], 'group': (0, 0)}, {'value': ['c', 'cc'], 'group': (0, 1)}]
HAND_MADE = {
    'sa_glue_cola': (CLASSES, CLASSES, [1, 0, 1, 0], -100.0),  # Matthews correlation -1
    'sa_glue_sst2': (CLASSES, CLASSES, [0, 0, 0, 0], 50.0),
    'sa_glue_mrpc': (CLASSES, CLASSES, [0, 1, 1, 1], (75.0 + 80.0) / 2),  # accuracy 3/4, F1 0.8
    'sa_glue_qqp': (CLASSES, CLASSES, [0, 1, 1, 1], (75.0 + 80.0) / 2),
    'sa_glue_stsb': ([1.0, 2.4, 3.8, 5.0], [1.0, 2.4, 3.8, 5.0], [3.0] * 4, 0.0),  # constant: NaN counts 0
    'sa_glue_mnli_matched': (CLASSES, CLASSES, [0, 0, 0, 0], 50.0),
    'sa_glue_mnli_mismatched': (CLASSES, CLASSES, [0, 1, 1, 1], 75.0),
    'sa_glue_qnli': (CLASSES, CLASSES, [0, 0, 0, 0], 50.0),
    'sa_glue_rte': (CLASSES, CLASSES, [1, 1, 1, 1], 50.0),
    'sa_glue_wnli': (CLASSES, CLASSES, [1, 0, 1, 0], 0.0),
    'sa_super_glue_boolq': (CLASSES, CLASSES, [0, 1, 0, 0], 75.0),
    'sa_super_glue_cb': ([0, 1, 2, 0], [0, 1, 2, 0], [0, 0, 0, 0], (50.0 + 100 * 2 / 9) / 2),  # macro-F1 (2/3)/3
    'sa_super_glue_copa': (CLASSES, CLASSES, [0, 0, 0, 0], 50.0),
    'sa_super_glue_multirc': (MULTIRC_T, MULTIRC_T, [{'value': 1}, {'value': 1}, {'value': 1}],
                              (50.0 + 80.0) / 2),  # exact match per question 1/2, F1a 0.8
    'sa_super_glue_record': (RECORD_T, [{'value': 'a b'}, {'value': 'cc'}], [{'value': 'a b'}, {'value': 'd'}],
                             50.0),  # EM 1/2 and F1 1/2
    'sa_super_glue_rte': (CLASSES, CLASSES, [0, 0, 0, 0], 50.0),
    'sa_super_glue_wic': (CLASSES, CLASSES, [1, 1, 1, 1], 50.0),
    'sa_super_glue_wsc': (CLASSES, CLASSES, [0, 1, 0, 1], 100.0),
    'sa_squad': ([['the cat sat'], ['dog', 'a dog']], ['The cat sat.', 'a dog'], ['cat sat', 'bird'], 50.0),
}


def test_downstream_score_of_perfect_and_of_wrong_predictions(vocab):
  assert sorted(HAND_MADE) == EVAL_TASKS
  perfect = {name: metrics_of(name, vocab, t, p) for name, (t, p, _, _) in HAND_MADE.items()}
  scores = downstream.downstream_score(perfect)
  assert 'missing' not in scores
  for key in ('glue_average', 'super_glue_average', 'squad_em', 'squad_f1', 'squad_score', 'downstream_score'):
    assert scores[key] == pytest.approx(100.0), key
  assert len(scores['task_scores']) == 9 + 8 + 1
  assert all(v == pytest.approx(100.0) for v in scores['task_scores'].values())

  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # constant predictions: an undefined correlation, ill-defined F1
    wrong = {name: metrics_of(name, vocab, t, w) for name, (t, _, w, _) in HAND_MADE.items()}
  scores = downstream.downstream_score(wrong)
  expected = {name: value for name, (_, _, _, value) in HAND_MADE.items()}
  for name, value in expected.items():
    assert downstream.task_score(wrong[name]) == pytest.approx(value), name
  mnli = (expected['sa_glue_mnli_matched'] + expected['sa_glue_mnli_mismatched']) / 2
  glue = [expected[f'sa_glue_{n}'] for n in ('cola', 'sst2', 'mrpc', 'qqp', 'stsb', 'qnli', 'rte', 'wnli')]
  glue_average = (sum(glue) + mnli) / 9
  super_glue_average = sum(expected[n] for n in EVAL_TASKS if n.startswith('sa_super_glue')) / 8
  assert scores['task_scores']['glue_mnli'] == pytest.approx(62.5)
  assert scores['glue_average'] == pytest.approx(glue_average) == pytest.approx(267.5 / 9)
  assert scores['super_glue_average'] == pytest.approx(super_glue_average)
  assert (scores['squad_em'], scores['squad_f1']) == (pytest.approx(50.0), pytest.approx(50.0))
  assert scores['downstream_score'] == pytest.approx((glue_average + super_glue_average + 50.0) / 3)

  # A missing task leaves its average (and the downstream score) out, and says which.
  partial = downstream.downstream_score({k: v for k, v in perfect.items() if k != 'sa_super_glue_cb'})
  assert partial['missing'] == ['sa_super_glue_cb'] and 'super_glue_average' not in partial
  assert 'downstream_score' not in partial and partial['glue_average'] == pytest.approx(100.0)


# ---- fine-tuning end to end -------------------------------------------------------------------------
def finetune_args(model_dir, initial_checkpoint, tfds_dir, *extra):
  """gin/runs/finetune.gin as shipped, shrunk to the tiny geometry, 2 steps, on the CPU mesh (the lengths
  are LENGTHS through TINY's train.feature_lengths, so INPUT_LENGTH / TARGET_LENGTH would be unused
  macros, which train refuses)."""
  return ['--gin_file=gin/models/vanilla.gin', '--gin_file=gin/sizes/tiny.gin', '--gin_file=gin/runs/finetune.gin',
          '--gin_file=gin/meshes/cpu.gin', *GEOMETRY, model_dir_flag(model_dir),
          f"--gin.INITIAL_CHECKPOINT='{initial_checkpoint}'", f"--gin.TFDS_DATA_DIR='{tfds_dir}'",
          '--gin.SPM_PATH=None', "--gin.ACTIVATION_DTYPE='float32'", "--gin.REMAT_POLICY='none'",
          '--gin.TRAIN_STEPS=2', '--gin.train.shuffle=False', '--gin.INFER_EVAL_EVERY_STEPS=1000',
          '--gin.evaluate.InferenceEvaluator.batch_size=8',
          f'--gin.evaluate.InferenceEvaluator.num_examples={MOCK_EXAMPLES}',
          # Under tfds.testing.mock_data, orbax's asynchronous save finds no array metadata at its
          # finalization (only there: real runs save asynchronously); save synchronously.
          '--gin.checkpoints.CheckpointConfig.async_save=False', *extra]


def test_finetune_on_the_mixture_decodes_and_scores_every_task(pretrained, tmp_path, capfd):
  model_dir = tmp_path / 'finetune'
  with mock_tfds():
    status, out, err = run(finetune_args(model_dir, pretrained, tmp_path / 'tfds'), capfd)
  assert status == 0, out + err
  assert f'Initialized from INITIAL_CHECKPOINT {pretrained} (parameters only; fresh optimizer state)' in out
  assert 'inference eval at step 2 (19 tasks): GLUE' in out and 'downstream' in out, out

  record = read_json(model_dir / 'run.json')
  assert record['status'] == 'complete' and record['step'] == 2 and record['downstream_step'] == 2
  assert sorted(record['task_metrics']) == EVAL_TASKS
  assert all(record['task_metrics'][t] for t in EVAL_TASKS)
  assert sorted(record['task_metrics']['sa_squad']) == ['em', 'f1']
  assert sorted(record['task_metrics']['sa_super_glue_multirc']) == ['exact_match', 'f1']
  for key in ('glue_average', 'super_glue_average', 'squad_em', 'squad_f1', 'downstream_score'):
    assert isinstance(record[key], float) and -100 <= record[key] <= 100, (key, record[key])
  assert record['missing'] == [] and len(record['task_scores']) == 18

  lines = [m for m in read_jsonl(model_dir) if m['step'] == 2 and 'downstream/downstream_score' in m]
  assert len(lines) == 1
  assert {f'infer/{t}/accuracy' for t in ('sa_glue_sst2', 'sa_super_glue_wsc')} <= set(lines[0])
  assert lines[0]['downstream/downstream_score'] == pytest.approx(record['downstream_score'])
  for name in EVAL_TASKS:
    with open(model_dir / 'inference_eval' / f'{name}-2.jsonl') as f:
      predictions = [json.loads(line) for line in f]
    assert len(predictions) == MOCK_EXAMPLES or name == 'sa_super_glue_record', name
    assert {'inputs', 'target', 'prediction', 'output'} <= set(predictions[0]), name
    assert isinstance(predictions[0]['output'], str)


def test_initial_checkpoint_gives_params_only_unless_asked_and_a_rerun_resumes(pretrained, tmp_path, capfd):
  """One fine-tuning step at learning rate 0 keeps the parameters: they are the pretrained ones, and the
  optimizer's step count shows whether its state started fresh (1) or came from the checkpoint (2 + 1).
  A rerun in the same MODEL_DIR resumes the fine-tuning run: its own checkpoint wins over
  INITIAL_CHECKPOINT. A MODEL_DIR holding another run of the model (the pretraining run: another task)
  is refused rather than resumed."""
  import orbax.checkpoint as ocp

  def finetune_local(model_dir, steps, *extra):
    return run([*FINETUNE_LOCAL, *GEOMETRY, model_dir_flag(model_dir),
                f"--gin.INITIAL_CHECKPOINT='{pretrained}'", '--gin.train.inference_evaluator=None',
                '--gin.LEARNING_RATE=0.0', f'--gin.TRAIN_STEPS={steps}', *extra], capfd)

  def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}

  def state(path):
    return ocp.PyTreeCheckpointer().restore(os.path.join(path, 'state'))

  pretrained_params = flat(state(pretrained)['params'])
  for restore_optimizer_state, expected_count in ((False, 1), (True, 3)):
    model_dir = tmp_path / f'ft_{restore_optimizer_state}'
    status, out, err = finetune_local(model_dir, 1, f'--gin.train.restore_optimizer_state={restore_optimizer_state}')
    assert status == 0, out + err
    how = 'parameters and optimizer state' if restore_optimizer_state else 'parameters only; fresh optimizer state'
    assert f'Initialized from INITIAL_CHECKPOINT {pretrained} ({how})' in out, out
    after = state(str(model_dir / 'checkpoints' / '1'))
    params = flat(after['params'])
    assert sorted(params) == sorted(pretrained_params)
    for name, value in pretrained_params.items():
      np.testing.assert_array_equal(params[name], value, err_msg=name)
    counts = [int(v) for k, v in flat(after['opt_state']).items() if k.rstrip("]'\"").endswith('count')]
    assert counts and set(counts) == {expected_count}, counts

  status, out, err = finetune_local(tmp_path / 'ft_False', 2)
  assert status == 0, out + err
  assert 'Restored from MODEL_DIR checkpoint at step 1' in out and 'INITIAL_CHECKPOINT' not in out, out
  assert read_json(tmp_path / 'ft_False' / 'run.json')['step'] == 2

  status, out, err = finetune_local(os.path.dirname(os.path.dirname(pretrained)), 3)
  assert_one_clean_error(status, out, err, 'different configuration',
                         "task: 'offline_span_corruption' there, 'sa_offline_completion' now")


@pytest.mark.parametrize('case', ['size', 'architecture'])
def test_initial_checkpoint_of_another_model_is_a_clear_error(pretrained, tmp_path, capfd, case):
  model_dir = tmp_path / 'ft'
  args = [*FINETUNE_LOCAL, *GEOMETRY, model_dir_flag(model_dir),
          f"--gin.INITIAL_CHECKPOINT='{pretrained}'"]
  if case == 'size':
    args += ['--gin.EMBED_DIM=32']
    phrase = 'shape ['
  else:
    args = args[:1] + ['--gin_file=gin/models/glu.gin'] + args[1:]
    phrase = "architecture 'vanilla' there, 'glu' now"
  status, out, err = run(args, capfd)
  message = assert_one_clean_error(status, out, err, f'INITIAL_CHECKPOINT {pretrained} was written by a '
                                   'different model', phrase)
  assert '\n' not in message.strip()
  assert not model_dir.exists()


def test_finetuning_without_initial_checkpoint_is_refused(tmp_path, capfd):
  status, out, err = run([*FINETUNE_LOCAL, *GEOMETRY,
                          model_dir_flag(tmp_path / 'ft')], capfd)
  assert_one_clean_error(status, out, err, 'INITIAL_CHECKPOINT is not set')
  assert not (tmp_path / 'ft').exists()


def test_evaluate_a_checkpoint(pretrained, tmp_path, capfd):
  """`python -m scaling_arch.evaluate` (its entry, in this process) on the offline completion task."""
  model_dir = tmp_path / 'eval'
  args = [*FINETUNE_LOCAL, '--gin_file=gin/runs/eval.gin', *GEOMETRY,
          model_dir_flag(model_dir), '--gin.evaluate.InferenceEvaluator.num_examples=16',
          '--gin.evaluate.InferenceEvaluator.batch_size=8']
  status, out, err = run(args + [f"--gin.CHECKPOINT_PATH='{pretrained}'"], capfd, entry=evaluate_lib.evaluate)
  assert status == 0, out + err
  assert f'Evaluating {pretrained} (step 2)' in out and 'inference eval at step 2 (1 tasks)' in out, out
  record = read_json(model_dir / 'run.json')
  assert sorted(record['task_metrics']) == ['sa_offline_completion']
  assert sorted(record['task_metrics']['sa_offline_completion']) == ['em', 'f1', 'sequence_accuracy']
  # Offline tasks alone: their score is the downstream score (scaling_arch/downstream.py, 4.)
  score = record['task_scores']['sa_offline_completion']
  assert record['missing'] == [] and record['downstream_score'] == record['offline_score'] == score
  assert list(record['task_scores']) == ['sa_offline_completion'] and 0 <= score <= 100
  with open(model_dir / 'inference_eval' / 'sa_offline_completion-2.jsonl') as f:
    lines = [json.loads(line) for line in f]
  assert len(lines) == 16 and lines[0]['inputs'].startswith('complete: ')
  assert read_jsonl(model_dir)[0]['infer/sa_offline_completion/f1'] >= 0

  status, out, err = run(args, capfd, entry=evaluate_lib.evaluate)  # eval.gin's CHECKPOINT_PATH = None
  assert_one_clean_error(status, out, err, 'CHECKPOINT_PATH is not set')


def test_a_mixer_pretrained_at_longer_lengths_initializes_a_shorter_one_by_its_prefix(tmp_path, capfd):
  """The Mixer's token-mixing weights are sized by the sequence lengths, and fine-tuning runs at shorter
  ones than pretraining (finetune_local: 64 / 16 after 128 / 32). A shorter Mixer is the longer one on
  padded inputs, so it starts from the prefix of each position-indexed weight, every other parameter
  unchanged; a longer one cannot start from the checkpoint, with a one-line error."""
  import orbax.checkpoint as ocp
  small = ['--gin_file=gin/models/mixer.gin', '--gin_file=gin/sizes/tiny.gin', '--gin.NUM_ENCODER_LAYERS=1',
           '--gin.NUM_DECODER_LAYERS=1', '--gin.EMBED_DIM=32', '--gin.MLP_DIM=64', '--gin.NUM_HEADS=2',
           '--gin.HEAD_DIM=16', '--gin.BATCH_SIZE=4', '--gin.train.eval_steps=1', '--gin.train.log_every_steps=1']
  pre_dir = tmp_path / 'pretrain'
  status, out, err = run([*small, '--gin_file=gin/runs/pretrain_local.gin', model_dir_flag(pre_dir),
                          '--gin.INPUT_LENGTH=32', '--gin.TARGET_LENGTH=8', '--gin.TRAIN_STEPS=2',
                          '--gin.checkpoints.CheckpointConfig.save_every_steps=2'], capfd)
  assert status == 0, out + err
  checkpoint = str(pre_dir / 'checkpoints' / '2')

  def finetune(model_dir, input_length, target_length):
    return run([*small, '--gin_file=gin/runs/finetune_local.gin', model_dir_flag(model_dir),
                f"--gin.INITIAL_CHECKPOINT='{checkpoint}'", '--gin.train.inference_evaluator=None',
                '--gin.LEARNING_RATE=0.0', '--gin.TRAIN_STEPS=1', f'--gin.INPUT_LENGTH={input_length}',
                f'--gin.TARGET_LENGTH={target_length}'], capfd)

  def flat(path):
    params = ocp.PyTreeCheckpointer().restore(os.path.join(path, 'state'))['params']
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}

  status, out, err = finetune(tmp_path / 'short', 16, 4)
  assert status == 0, out + err
  assert 'position-indexed parameters cut to this run' in out, out
  before, after = flat(checkpoint), flat(str(tmp_path / 'short' / 'checkpoints' / '1'))
  assert sorted(before) == sorted(after)
  cut = [name for name in before if before[name].shape != after[name].shape]
  assert {n.rsplit("['", 1)[-1].rstrip("']") for n in cut} == {'w1', 'w2', 'b1', 'b2'} and len(cut) >= 6, cut
  decoder_w1 = next(n for n in cut if "decoder" in n and n.endswith("['w1']"))
  assert after[decoder_w1].shape[-2:] == (4, 4) and before[decoder_w1].shape[-2:] == (8, 8)
  for name, value in before.items():  # learning rate 0: the fine-tuned step holds the initial parameters
    np.testing.assert_array_equal(after[name], value[tuple(slice(0, n) for n in after[name].shape)], err_msg=name)

  status, out, err = finetune(tmp_path / 'long', 64, 8)
  assert_one_clean_error(status, out, err, f'INITIAL_CHECKPOINT {checkpoint} was written by a different model',
                         'shape [')
  assert not (tmp_path / 'long').exists()
