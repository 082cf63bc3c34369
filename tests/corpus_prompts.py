"""A corpus of chat prompts for running nudging end to end on the simulator pair.

Most prompts are plain questions (no simulator keyword; see upstreams/simulator/documents.py
for the keywords and what they trigger). Some carry a system prompt, some use a keyword on
purpose (a song, a joke, a list, a link, a table, a recap, many examples, a brief answer), and
a few change a request setting where a rule needs it (a small budget, a one-token lookahead,
clean-up). Only prompts with `default_settings` count towards the corpus's nudging ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_TOKENS = 400


@dataclass(frozen=True, slots=True)
class CorpusPrompt:
    name: str
    user: str
    system: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    lookahead_tokens: int | None = None  # None: NudgingParams' default
    cleanup: bool = False
    why: str = ""  # what the prompt is there for, beyond variety

    @property
    def default_settings(self) -> bool:
        return (self.max_tokens == DEFAULT_MAX_TOKENS and self.lookahead_tokens is None
                and not self.cleanup)


HELPFUL = "You are a helpful assistant."
TEACHER = "You are a patient teacher who explains things to curious students."
EXPERT = "You are an expert consultant. Answer precisely."

CORPUS: tuple[CorpusPrompt, ...] = (
    # Plain questions: science and nature.
    CorpusPrompt("leaves", "Why do leaves change color in autumn?"),
    CorpusPrompt("fridge", "How does a refrigerator keep food cold?"),
    CorpusPrompt("tides", "What causes the tides in the ocean?"),
    CorpusPrompt("rainbow", "How are rainbows formed after a storm?"),
    CorpusPrompt("bees", "Why are bees important for agriculture?", system=HELPFUL),
    CorpusPrompt("volcano", "What happens inside a volcano before it erupts?"),
    CorpusPrompt("magnets", "How do magnets attract metal objects?"),
    CorpusPrompt("stars", "Why do stars twinkle at night?", system=TEACHER),
    CorpusPrompt("vaccines", "How do vaccines train the immune system?"),
    CorpusPrompt("desert", "How do camels survive in the desert?"),
    CorpusPrompt("coral", "What threatens coral reefs today?"),
    CorpusPrompt("sleep", "Why do humans need sleep?"),
    # History, society, economics.
    CorpusPrompt("printing", "Tell me about the history of the printing press."),
    CorpusPrompt("rome", "What led to the fall of the Roman Empire?", system=TEACHER),
    CorpusPrompt("inflation", "What is inflation and why does it matter?"),
    CorpusPrompt("democracy", "How did democracy develop in ancient Athens?"),
    CorpusPrompt("silkroad", "What was traded along the Silk Road?"),
    CorpusPrompt("unions", "Why were labor unions formed during industrialization?"),
    CorpusPrompt("banks", "How do central banks set interest rates?", system=EXPERT),
    # Technology.
    CorpusPrompt("internet", "How does the internet route data between computers?"),
    CorpusPrompt("compilers", "What does a compiler do with source code?"),
    CorpusPrompt("encryption", "Explain public key encryption in simple terms."),
    CorpusPrompt("batteries", "How do lithium batteries store energy?", system=HELPFUL),
    CorpusPrompt("gps", "How does GPS determine my position?"),
    CorpusPrompt("databases", "When should I use a relational database?", system=EXPERT),
    # Everyday life and how-to, different phrasings.
    CorpusPrompt("sourdough", "How do I bake sourdough bread at home?"),
    CorpusPrompt("budgeting", "I want to save money each month. Where should I begin?"),
    CorpusPrompt("running", "What should a beginner know before training for a marathon?"),
    CorpusPrompt("garden", "Could you describe how to start a vegetable garden on a balcony?"),
    CorpusPrompt("coffee", "What makes espresso different from drip coffee?"),
    CorpusPrompt("moving", "Moving to a new city soon. How do I make friends there?",
                 system="You are a friendly life coach."),
    CorpusPrompt("chess", "How do chess players plan their opening moves?"),
    CorpusPrompt("painting", "Explain how watercolor painting works."),
    CorpusPrompt("jazz", "What makes jazz improvisation special?"),
    CorpusPrompt("glaciers", "Describe how glaciers shape valleys over time."),
    # Keywords on purpose: layout and style features.
    CorpusPrompt("tips", "Give me a list of tips for learning a new language.",
                 why="numbered list: newlines inside words"),
    CorpusPrompt("steps", "What are the steps to change a flat tire?", system=HELPFUL,
                 why="numbered list"),
    CorpusPrompt("spacing", "Explain spacing in typography.", why="double spaces: empty words"),
    CorpusPrompt("spaces", "Why do some writers put two spaces after a period?",
                 why="double spaces: empty words"),
    CorpusPrompt("link", "Can you share a link to a source about volcanoes?",
                 why="a URL: one word of 16 tokens"),
    CorpusPrompt("cite", "Please cite a reference on the history of tea.",
                 why="a URL: one word of 16 tokens"),
    CorpusPrompt("table", "Make a table comparing cats and dogs.",
                 why="a markdown rule: one word of 16 tokens"),
    CorpusPrompt("outline", "Write an outline for an essay about climate policy.",
                 why="a markdown rule"),
    # Keywords on purpose: what the base does when left alone.
    CorpusPrompt("recap", "Give me a recap of the causes of World War One.",
                 why="the base copies its own sentences: step-7 repetition guards"),
    CorpusPrompt("summary", "Write a summary of how photosynthesis works.",
                 why="the base copies its own sentences"),
    CorpusPrompt("examples", "Give many examples of renewable energy.",
                 why="the base's ' and so on,' cycle: chunk repeats"),
    CorpusPrompt("count", "Count the ways rivers change a landscape.",
                 why="the base's cycle"),
    CorpusPrompt("brief", "Briefly explain photosynthesis.",
                 why="the base stops: empty probe, then a base stop or an empty chunk"),
    CorpusPrompt("short", "Give a short answer: why is the sky blue?",
                 why="the base stops"),
    CorpusPrompt("quick", "Quick question: how do airplanes stay in the air?",
                 system=HELPFUL, why="the base stops"),
    CorpusPrompt("concise", "Be concise. What is a black hole?", why="the base stops"),
    CorpusPrompt("tldr", "TLDR of how elections work in parliamentary systems?",
                 why="the base stops"),
    CorpusPrompt("prime", "Briefly, what is a prime number?", why="the base stops"),
    CorpusPrompt("neuron", "Quickly explain what a neuron does.", why="the base stops"),
    CorpusPrompt("renaissance", "Give me a brief overview of the Renaissance.",
                 system=TEACHER, why="the base stops"),
    # Keywords on purpose: the aligned model loops.
    CorpusPrompt("song", "Sing a song about the sea.",
                 why="the aligned model loops: repeated nudging words"),
    CorpusPrompt("joke", "Tell me a funny joke about computers.",
                 why="the aligned model loops"),
    # Request-level variations.
    CorpusPrompt("budget", "How do tides affect coastal fishing?", max_tokens=40,
                 why="the budget binds in the middle of a base continuation"),
    CorpusPrompt("budget-list", "List the reasons forests matter for the climate.",
                 max_tokens=70, why="the budget binds mid-continuation"),
    CorpusPrompt("rounds", "How do migrating birds find their way across oceans?",
                 max_tokens=2000, lookahead_tokens=1,
                 why="a one-token lookahead never probes the base: the round limit"),
    CorpusPrompt("cleanup-song", "Write a song about rainy days.", cleanup=True,
                 why="the output ends in a repeat: the paper's clean-up removes it"),
    CorpusPrompt("cleanup-poem", "Write a funny poem about socks.", cleanup=True,
                 why="the output ends in a repeat: clean-up"),
    # Last, so that the spreads other tests take (CORPUS[::8]) stay as they were.
    CorpusPrompt("emoji", "Describe the ocean with emoji.",
                 why="emoji: a character over three tokens, the first two with no text"),
)
