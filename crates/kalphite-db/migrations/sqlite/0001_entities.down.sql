DROP TABLE kalphite_entities;
