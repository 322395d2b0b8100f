"""Data tools: generating instruction data through an OpenAI-style API, converting between
formats, a report on a data file before training (the doctor), and mixing several files.

The thin command-line tools on top are tools/self_instruct.py, tools/convert_data.py and
tools/data_doctor.py; finetune.py and finetune_chat.py call `mixing` for --data_weights.
"""
