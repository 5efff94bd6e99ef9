#!/usr/bin/env sh
# Regenerates the built-in reference clips in this folder: synthetic espeak-ng speech,
# converted by FFmpeg to 24 kHz mono 16-bit FLAC. Needs espeak-ng and ffmpeg
# (Debian: apt-get install -y espeak-ng ffmpeg). Run from anywhere: ./voices/make_builtin_voices.sh
set -eu
cd "$(dirname "$0")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

make() {  # make <id> <espeak voice+variant> <pitch 0-99> <words per minute> <text>
    espeak-ng -v "$2" -p "$3" -s "$4" -w "$tmp/$1.wav" "$5"
    ffmpeg -hide_banner -loglevel error -y -i "$tmp/$1.wav" \
        -af "highpass=f=60,loudnorm=I=-20:TP=-2" -ac 1 -ar 24000 -sample_fmt s16 \
        -compression_level 12 -map_metadata -1 -fflags +bitexact -flags:a +bitexact "$1.flac"
}

make aria "en-us+f3" 62 150 \
    "The morning train was late again, so I walked along the river and watched the boats. By noon the sun had burned away the fog."
make james "en-gb-x-rp+m3" 42 145 \
    "Good evening, and welcome to the programme. Tonight we look at how small towns are changing, and what the people who live there think about it."
make olivia "en-gb+f2" 68 150 \
    "Please remember to water the plants on the balcony while I am away. The tall ones need a full can every second day, and the herbs only a little."
make marcus "en-us+m7" 30 140 \
    "Every great journey starts with a single step. Take your time, check the map, and pack something warm for the long night ahead."
make river "en-gb-scotland+m2" 50 150 \
    "We climbed the hill behind the village just before dawn. The wind was cold, but the view across the valley made every step of the climb worth it."
