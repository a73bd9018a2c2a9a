// mmpo report: draws the curves with plotly.js and lets the reader browse logged rollouts by step.
// Listeners are attached here; the page carries no inline handlers.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("mmpo-data").textContent);
  var plots = document.querySelectorAll("div.plot[data-fig]");
  for (var i = 0; i < plots.length; i++) {
    var fig = data.figures[Number(plots[i].getAttribute("data-fig"))];
    Plotly.newPlot(plots[i], fig.data, fig.layout, data.config);
  }

  var select = document.getElementById("rollout-step");
  if (!select) return;
  var panels = document.querySelectorAll("div.rollout-step");

  function show(step) {
    for (var i = 0; i < panels.length; i++) {
      var panel = panels[i];
      var on = panel.getAttribute("data-step") === step;
      panel.hidden = !on;
      if (!on) continue;
      var pending = panel.querySelectorAll("img[data-src]");
      for (var j = 0; j < pending.length; j++) {
        pending[j].setAttribute("src", pending[j].getAttribute("data-src"));
        pending[j].removeAttribute("data-src");
      }
    }
    select.value = step;
  }

  function move(delta) {
    var k = select.selectedIndex + delta;
    if (k >= 0 && k < select.options.length) show(select.options[k].value);
  }

  select.addEventListener("change", function () { show(select.value); });
  document.getElementById("rollout-prev").addEventListener("click", function () { move(-1); });
  document.getElementById("rollout-next").addEventListener("click", function () { move(1); });
  window.mmpoShowStep = show;  // for tests and screenshots: show one step's rollouts
})();
