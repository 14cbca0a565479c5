"""The data package: seqio span-corruption tasks, vocabularies, the offline corpus, trainer batches."""

from tasks.data import check_split_not_empty
from tasks.data import get_dataset
from tasks.offline_corpus import corpus_files
from tasks.pretraining import c4_span_corruption_task
from tasks.finetuning import get_task  # pretraining and fine-tuning tasks by name
from tasks.pretraining import offline_span_corruption_task
from tasks.pretraining import span_corruption_targets_length
from tasks.vocabularies import get_vocabulary
from tasks.vocabularies import offline_vocabulary
from tasks.vocabularies import padded_vocab_size
from tasks.vocabularies import sentencepiece_vocabulary

__all__ = [
    'c4_span_corruption_task', 'check_split_not_empty', 'corpus_files', 'get_dataset', 'get_task',
    'get_vocabulary', 'offline_span_corruption_task', 'offline_vocabulary', 'padded_vocab_size',
    'sentencepiece_vocabulary', 'span_corruption_targets_length',
]
