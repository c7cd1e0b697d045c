"""memopt: train large language models on limited GPU memory -- by measuring it.

One module per technique, plus the measuring instruments:

=====================  ==========================================================
``profiler``           peak/breakdown of a step on CPU (tracker) and CUDA (allocator)
``calculator``         the arithmetic to predict memory before measuring it
``device``/``profiles``  what hardware this is and which shapes the labs use
``models``/``text``    GPT-2 and Llama-7B shapes, online or offline; corpus, tokenizers
``checks``             the graded checks of every lab
``labgen``/``notebook``  labs generated from solutions; graded cells pulled out of notebooks
=====================  ==========================================================
"""
__version__ = "0.1.0"
