"""Wrong answers of lab 11 (budget design): each replaces one graded function of the instructor's solution."""
from memopt_lib import budget_design
from memopt_lib.recipe import Recipe

from . import Wrong


def no_technique(card_gb, model, batch, seq):
    """autocast and nothing else for GPT-2, whatever the card: does not fit the small cards."""
    if model == "gpt2":
        return Recipe("amp", precision="amp")
    return budget_design.design_recipe(card_gb, model, batch, seq)


def everything_on(card_gb, model, batch, seq):
    """every GPT-2 technique on every card: fits, but pays checkpointing where the card did not need it."""
    if model == "gpt2":
        return Recipe("all on", precision="pure-bf16", checkpointing=True, micro_batches=2, optimizer="adamw_8bit")
    return budget_design.design_recipe(card_gb, model, batch, seq)


def lora_on_gpt2(card_gb, model, batch, seq):
    if model == "gpt2":
        return Recipe("LoRA", precision="amp", lora_rank=16)
    return budget_design.design_recipe(card_gb, model, batch, seq)


def returns_a_dict(card_gb, model, batch, seq):
    return budget_design.design_recipe(card_gb, model, batch, seq).to_dict()


def static_state_only(recipe, model, batch, seq):
    """weights + optimizer state, no activations: the peak of lab 01's first guess."""
    full = budget_design.predict_peak_gib(recipe, model, batch, seq)
    one_token = budget_design.predict_peak_gib(recipe, model, 1, 1)
    return one_token if full > 0 else full


def in_mib(recipe, model, batch, seq):
    return budget_design.predict_peak_gib(recipe, model, batch, seq) * 1024


def time_always_one(recipe, model, batch, seq):
    return 1.0


D, P, T = "design_recipe", "predict_peak_gib", "predict_step_time_ratio"
FIT, COST, PEAK, TIME = ("fits_the_card", "pays_only_for_what_it_needs", "peak_prediction_accurate",
                         "step_time_prediction_accurate")
WRONG = [
    Wrong("design: autocast only, for every card", D, no_technique, (FIT,), r"does not fit"),
    Wrong("design: every technique on every card", D, everything_on, (COST,), r"same GPT-2 recipe for every card"),
    Wrong("design: LoRA on a full fine-tuning task", D, lora_on_gpt2, (FIT,), r"full fine-tuning"),
    Wrong("design: returns a dict", D, returns_a_dict, (FIT,), r"not a memopt_lib.recipe.Recipe"),
    Wrong("peak: weights and optimizer state only", P, static_state_only, (PEAK,), r"activations of one micro-batch"),
    Wrong("peak: MiB instead of GiB", P, in_mib, (PEAK,), r"GiB, not MiB"),
    Wrong("time: 1.0 for every recipe", T, time_always_one, (TIME,), r"twice the fp32 rate"),
]


def asks_the_predictor(recipe, model, batch, seq):
    """the graded model itself instead of arithmetic: right numbers, no understanding."""
    from memopt_lib.bench import Row
    from memopt_lib.predict import cost, predict_step
    p = predict_step(cost.CARDS[24].gpu, model, batch, seq, row=Row(recipe.name, recipe), steps=2)
    return p["peak_allocated_bytes"] / 2**30


def asks_the_cost_model(recipe, model, batch, seq):
    from memopt_lib.predict import cost
    return cost.time_ratio(cost.CARDS[24], model, batch, seq, recipe)


WRONG += [
    Wrong("peak: calls the library's predictor", P, asks_the_predictor, (PEAK,), r"your own arithmetic"),
    Wrong("time: calls the library's cost model", T, asks_the_cost_model, (TIME,), r"your own FLOP arithmetic"),
]
