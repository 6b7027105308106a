"""Conversations, end to end through a real ``oco run``: a callback asks the person a
question (``message.ask``) and gets that person's next message in that room as the
answer, which the routes do not see; others in the room are unaffected; a wrong choice
is asked again by the bot; a timeout raises, and the person's next message goes to the
routes again; a handler that stops waiting cancels its question; a bot that stops says so to the
person it was waiting for; two replicas of one
callback each get the answers to their own questions.

Chat is played through the memory adapter's control service.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

from oco_core.testing import ControlChat, run_oco

CALLBACK = """
import os
import subprocess
import sys

import trio

from oco_core import Callback, Message, QuestionUnansweredError

if len(sys.argv) > 1 and sys.argv[1] == "replicas":  # a second replica of this callback, alongside
    replica = subprocess.Popen([sys.executable, __file__], env={**os.environ, "REPLICA": "b"})
else:
    replica = None
bot = Callback()
me = os.environ.get("REPLICA", "a")


@bot.respond(r"^deploy (\\w+)$")
async def deploy(message: Message) -> None:
    try:
        answer = await message.ask(
            f"Which environment for {message.match(1)}?", timeout=2, choices=["staging", "prod"]
        )
    except QuestionUnansweredError as exc:
        await message.send(f"gave up on {message.match(1)}: timed_out={exc.timed_out}")
        return
    await message.send(f"deploying {message.match(1)} to {answer.body} (asked by {me}, answer from {answer.user.id})")


@bot.respond(r"^wait$")
async def wait(message: Message) -> None:
    with trio.move_on_after(1):  # the handler stops waiting: the question is cancelled in the bot
        await message.ask("Anything to add?", timeout=60)
    await message.send("stopped asking")


@bot.hear(r"^(prod|staging|qa)$")
async def heard(message: Message) -> None:
    await message.send(f"route heard {message.body} from {message.user.id}")


try:
    bot.run()
finally:
    if replica is not None:
        replica.terminate()
        replica.wait()
"""


def bot_yaml(tmp_path: Path, *args: str) -> str:
    script = tmp_path / "deployer.py"
    script.write_text(CALLBACK)
    command = ", ".join(json.dumps(a) for a in [sys.executable, str(script), *args])
    return (
        "adapters:\n  - {type: memory, control: '127.0.0.1:0', control_address_file: control.address}\n"
        "grpc: {listen: '127.0.0.1:0'}\n"
        f"store: {{url: 'sqlite:///{tmp_path / 'oco.db'}'}}\n"
        "callbacks:\n"
        f"  - id: deployer\n    command: [{command}]\n"
    )


async def test_the_answer_goes_to_the_asker_not_the_routes_and_a_wrong_choice_is_asked_again(tmp_path: Path) -> None:
    async with run_oco(bot_yaml(tmp_path), tmp_path) as bot:
        address = await bot.written("control.address")
        await bot.expect(r"callback 'deployer' is listening", stream="stderr")
        room = ControlChat(address)
        assert any(
            "Which environment for api?" in line for line in await room.say_as("alice", "oco deploy api", until="Which")
        )
        # Someone else in the room is unaffected: the routes hear bob.
        await room.say_as("bob", "prod", until="route heard prod from memory/bob")
        # A wrong choice: the bot itself asks again, and the question stays open.
        again = await room.say_as("alice", "qa", until="please answer one of")
        assert "staging, prod" in " ".join(again)
        done = await room.say_as("alice", "PROD", until="deploying api")
        assert "deploying api to PROD (asked by a, answer from memory/alice)" in done
        # Answered: alice's next message goes to the routes again; none of her answers did.
        await room.say_as("alice", "staging", until="route heard staging from memory/alice")
        assert not any(
            "from memory/alice" in line for line in room.lines if "route heard" in line and "staging" not in line
        )


async def test_a_question_in_private_is_answered_in_private_and_not_by_the_room(tmp_path: Path) -> None:
    async with run_oco(bot_yaml(tmp_path), tmp_path) as bot:
        address = await bot.written("control.address")
        await bot.expect(r"callback 'deployer' is listening", stream="stderr")
        room = ControlChat(address)
        await room.say_as("alice", "deploy db", until="Which environment for db?", room="")
        # The same person in a room is not answering: the routes hear her there.
        await room.say_as("alice", "prod", until="route heard prod from memory/alice")
        done = await room.say_as("alice", "staging", until="deploying db", room="")
        assert "deploying db to staging (asked by a, answer from memory/alice)" in done


async def test_a_question_times_out_and_the_person_talks_to_the_routes_again(tmp_path: Path) -> None:
    async with run_oco(bot_yaml(tmp_path), tmp_path) as bot:
        address = await bot.written("control.address")
        await bot.expect(r"callback 'deployer' is listening", stream="stderr")
        room = ControlChat(address)
        await room.say_as("alice", "oco deploy web", until="Which environment for web?")
        with trio.fail_after(10):  # the question's timeout is 2 s
            await room.say_as("carol", "staging", until="gave up on web: timed_out=True")
        await room.say_as("alice", "prod", until="route heard prod from memory/alice")


async def test_a_handler_that_stops_waiting_cancels_its_question(tmp_path: Path) -> None:
    async with run_oco(bot_yaml(tmp_path), tmp_path) as bot:
        address = await bot.written("control.address")
        await bot.expect(r"callback 'deployer' is listening", stream="stderr")
        room = ControlChat(address)
        await room.say_as("alice", "oco wait", until="Anything to add?")
        await room.say_as("bob", "qa", until="stopped asking")
        await room.say_as("alice", "prod", until="route heard prod from memory/alice")


async def test_a_bot_that_stops_tells_the_person_their_question_ended(tmp_path: Path) -> None:
    config = bot_yaml(tmp_path).replace(
        "adapters:\n  - {type: memory, control: '127.0.0.1:0', control_address_file: control.address}\n",
        "adapters: [{type: shell, user: alice}]\n",
    )
    async with run_oco(config, tmp_path) as bot:
        await bot.expect(r"callback 'deployer' is listening", stream="stderr")
        await bot.write("oco deploy api")
        await bot.expect(r"Which environment for api\?")
        assert await bot.stop() == 0
        said = "\n".join(bot.stdout_lines)
        assert (
            "the bot is restarting: it no longer waits for your answer to \u201cWhich environment for api?\u201d"
            in said
        )


async def test_two_replicas_each_get_the_answers_to_their_own_questions(tmp_path: Path) -> None:
    async with run_oco(bot_yaml(tmp_path, "replicas"), tmp_path) as bot:
        address = await bot.written("control.address")
        await bot.expect(r"callback 'deployer' is listening", stream="stderr", count=2)  # both replicas
        room = ControlChat(address)
        askers: set[str] = set()
        # Two questions open at once in each round; matches go to the replicas round-robin.
        for turn in range(8):
            people = [f"p{turn}a", f"p{turn}b"]
            for person in people:
                await room.say_as(person, f"oco deploy {person}", until=f"Which environment for {person}?")
            for person in people:
                done = await room.say_as(person, "staging", until=f"deploying {person}")
                line = next(line for line in done if f"deploying {person}" in line)
                assert f"answer from memory/{person})" in line
                askers.add(line.split("asked by ")[1][0])
            if askers == {"a", "b"}:
                break
        assert askers == {"a", "b"}, "the matches went to one replica only: the test proves nothing"
