"""Ask a running `hcx-extend serve` about a recording with the official openai client.

    hcx-extend demo                                          # writes runs/imu-demo/
    hcx-extend serve runs/imu-demo/checkpoint &              # http://127.0.0.1:8000
    python examples/openai_client.py runs/imu-demo/recordings/walking.csv

The recording travels inline as an ``input_sensor`` content part (the server never reads its own
files for a request); ``docs/serving.md`` lists every field.
"""

import argparse

import numpy as np
from openai import OpenAI

from hcx_extend.data.basic_motions import QUESTION


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recording", help="a CSV file with a header row naming the modality's channels")
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
    parser.add_argument("--modality", default="imu")
    parser.add_argument("--rate", type=float, default=10.0, help="the recording's sample rate in Hz")
    parser.add_argument("--question", default=QUESTION)
    args = parser.parse_args()

    recording = np.loadtxt(args.recording, delimiter=",", skiprows=1, ndmin=2)
    client = OpenAI(base_url=args.url, api_key=args.api_key)
    messages = [{"role": "user", "content": [
        {"type": "input_sensor",
         "input_sensor": {"modality": args.modality, "data": recording.tolist(), "sample_rate": args.rate}},
        {"type": "text", "text": args.question}]}]
    for chunk in client.chat.completions.create(model=client.models.list().data[0].id, messages=messages,
                                                max_tokens=8, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
