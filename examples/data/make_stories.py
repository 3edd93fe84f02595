"""Writes short Russian everyday stories from hand-written phrase tables (seeded; no network).

    python examples/data/make_stories.py --docs 4000 --seed 1 --output runs/tiny/stories.txt

The demo's training text: the bundled 38 KB corpus is far too small for a model to learn from
without memorising it, so `make demo` trains on as many stories as it needs. Every phrase was
written for megatron_ru; the generator combines them with grammatical agreement (gender and
number of the subject choose the verb's past-tense ending and the pronoun), so a model can
learn real regularities of Russian, and stories from another seed are held-out text of the same
kind. One story per paragraph, paragraphs separated by a blank line.
"""
import argparse
import os
import random

# subject (nominative), gender/number: m, f, pl
SUBJECTS = [
    ("мальчик", "m"), ("девочка", "f"), ("старый рыбак", "m"), ("бабушка", "f"),
    ("учительница", "f"), ("почтальон", "m"), ("дети", "pl"), ("соседи", "pl"), ("кот", "m"),
    ("собака", "f"), ("дедушка", "m"), ("мама", "f"), ("папа", "m"), ("студентка", "f"),
    ("пекарь", "m"), ("врач", "m"), ("сестра", "f"), ("брат", "m"), ("туристы", "pl"),
    ("школьники", "pl"), ("художник", "m"), ("музыкант", "m"), ("библиотекарь", "m"),
    ("повар", "m"), ("садовница", "f"), ("водитель автобуса", "m"), ("подруги", "pl"),
]
PRONOUN = {"m": "Он", "f": "Она", "pl": "Они"}
# verb stems with past endings m / f / pl, and objects they take
ACTIONS = [
    (("купил", "купила", "купили"), ["свежий хлеб", "новую книгу", "красные яблоки",
                                     "тёплый шарф", "банку мёда", "билет на поезд",
                                     "букет цветов", "пакет молока"]),
    (("нашёл", "нашла", "нашли"), ["старый ключ", "красивый камень", "потерянную варежку",
                                   "гриб под берёзой", "письмо в почтовом ящике", "дорогу домой"]),
    (("прочитал", "прочитала", "прочитали"), ["интересную книгу", "длинное письмо",
                                             "свежую газету", "сказку о море", "стихи о зиме"]),
    (("приготовил", "приготовила", "приготовили"), ["вкусный суп", "горячие блины",
                                                   "яблочный пирог", "кашу с маслом",
                                                   "крепкий чай"]),
    (("увидел", "увидела", "увидели"), ["большую лодку", "белого зайца", "яркую радугу",
                                       "старый маяк", "стаю птиц", "поезд на мосту"]),
    (("нарисовал", "нарисовала", "нарисовали"), ["синее море", "высокие горы", "зимний лес",
                                                "портрет друга", "весёлого кота"]),
    (("починил", "починила", "починили"), ["старый велосипед", "сломанный стул", "забор у дома",
                                          "часы на стене", "крышу сарая"]),
]
MOTION = [("пошёл", "пошла", "пошли"), ("поехал", "поехала", "поехали"),
          ("отправился", "отправилась", "отправились")]
PLACES_TO = ["на рынок", "в магазин у станции", "на берег реки", "в городскую библиотеку",
             "в лес за грибами", "на почту", "в парк", "к старому мосту", "в музыкальную школу",
             "на вокзал", "в сад", "в пекарню на углу"]
PLACES_AT = ["на рынке", "в магазине", "на берегу реки", "в библиотеке", "в лесу", "на почте",
             "в парке", "у старого моста", "в школе", "на вокзале", "в саду", "в пекарне"]
TIMES = ["Утром", "Вечером", "В субботу", "Зимой", "Летом", "Осенью", "Весной", "После обеда",
         "Рано утром", "В воскресенье", "На следующий день", "Однажды"]
WEATHER = ["Светило яркое солнце.", "Шёл мелкий дождь.", "Дул холодный ветер.",
           "На улице было тихо и тепло.", "Падал мягкий снег.", "Над рекой стоял туман.",
           "Небо было ясным и синим."]
FEELINGS = [("был очень рад", "была очень рада", "были очень рады"),
            ("устал", "устала", "устали"),
            ("удивился", "удивилась", "удивились"),
            ("улыбнулся", "улыбнулась", "улыбнулись")]
ENDINGS = ["Вечером все пили чай и вспоминали этот день.", "Домой вернулись уже в темноте.",
           "Это был хороший день.", "Об этом потом долго рассказывали соседям.",
           "На следующий день всё повторилось снова.", "А ночью за окном тихо шумел ветер."]
FORM = {"m": 0, "f": 1, "pl": 2}


def story(rng: random.Random) -> str:
    subject, g = rng.choice(SUBJECTS)
    k = FORM[g]
    pron = PRONOUN[g]
    where = rng.randrange(len(PLACES_TO))
    actions = rng.sample(ACTIONS, rng.randrange(2, 5))  # distinct deeds, the first at the place
    verbs, objects = actions[0]
    parts = [f"{rng.choice(TIMES)} {subject} {rng.choice(MOTION)[k]} {PLACES_TO[where]}.",
             rng.choice(WEATHER),
             f"{PLACES_AT[where].capitalize()} {pron.lower()} {verbs[k]} {rng.choice(objects)}."]
    for verbs2, objects2 in actions[1:]:
        link = rng.choice(["Потом", "Затем", "После этого", "А ещё"])
        parts.append(f"{link} {pron.lower()} {verbs2[k]} {rng.choice(objects2)}.")
    parts.append(f"{pron} {rng.choice(FEELINGS)[k]}.")
    parts.append(rng.choice(ENDINGS))
    return " ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=4000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output", required=True)
    a = p.parse_args()
    rng = random.Random(a.seed)
    text = "\n\n".join(story(rng) for _ in range(a.docs)) + "\n"
    tmp = a.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, a.output)
    print(f"{a.docs} stories, {len(text.encode('utf-8')):,} bytes -> {a.output}")


if __name__ == "__main__":
    main()
